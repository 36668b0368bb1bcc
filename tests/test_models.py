"""Models: shapes, parameter counts (against the PyTorch twins), BatchNorm state, member vmap.

Flax initialisers are slow to compile on a CPU, so these tests take shapes from
``jax.eval_shape(model.init, ...)`` and fill them with NumPy draws instead of calling ``init``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax import models
from ocljax.errors import ConfigError

SHAPES = [(32, 32, 3), (28, 28, 1)]

# Trainable parameters, counted by hand (BatchNorm: scale and bias per channel).
EXPECTED_PARAMS = {
    # 784-256-256-10
    ("mlp", (28, 28, 1)): 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10,  # 269,322
    # conv3x3(32)-pool-conv3x3(64)-pool-dense(256)-dense(10); 28 -> 14 -> 7, 32 -> 16 -> 8
    ("cnn", (28, 28, 1)): (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 256 + 256)
    + (256 * 10 + 10),  # 824,458
    ("cnn", (32, 32, 3)): (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (8 * 8 * 64 * 256 + 256)
    + (256 * 10 + 10),  # 1,070,794
    ("resnet18", (32, 32, 3)): 1_094_750,  # the count in ocljax/models/resnet.py's docstring
}


def resnet18_count(nf=20, in_ch=3, classes=10):
    """The reduced ResNet-18's parameters from its definition, stage by stage."""
    n = 9 * in_ch * nf + 2 * nf  # stem conv + BN
    c_in = nf
    for mult in (1, 2, 4, 8):
        c = nf * mult
        n += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c  # first block
        if c_in != c:
            n += c_in * c + 2 * c  # 1x1 shortcut + BN
        n += 2 * (9 * c * c + 2 * c)  # second block
        c_in = c
    return n + 8 * nf * classes + classes


def n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_init(model, in_shape, batch=2):
    x = jax.ShapeDtypeStruct((batch, *in_shape), jnp.uint8)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def random_variables(model, in_shape, seed):
    """Parameters and BatchNorm statistics of ``model``'s shapes, drawn with NumPy."""
    params, state = abstract_init(model, in_shape)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        shape = leaf.shape
        if "kernel" in name:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif "scale" in name:
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif "var" in name:
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # biases, running means
            value = 0.1 * rng.normal(size=shape)
        return jnp.asarray(value, jnp.float32)

    return (jax.tree_util.tree_map_with_path(draw, params),
            jax.tree_util.tree_map_with_path(draw, state))


@functools.lru_cache
def model_and_apply(name):
    """``make_model(name, 10)`` and its jitted ``apply`` (shared, so tests reuse compilations;
    op-by-op dispatch of a ResNet compiles every layer's shapes separately and is slower)."""
    model = models.make_model(name, 10)
    return model, jax.jit(model.apply, static_argnums=3)


@pytest.fixture
def torch():
    """PyTorch (skipped where absent), on one thread: these workloads are tiny, and extra
    threads only contend for the cores of a busy machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def images(n, in_shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *in_shape), dtype=np.uint8)


@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("name", models.MODELS)
def test_output_shapes(name, in_shape):
    model = models.make_model(name, 10)
    params, state = abstract_init(model, in_shape)
    x = jax.ShapeDtypeStruct((5, *in_shape), jnp.uint8)
    for train in (False, True):
        logits, feats, new_state = jax.eval_shape(
            functools.partial(model.apply, train=train), params, state, x)
        assert logits.shape == (5, 10) and feats.shape == (5, model.feature_dim)
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert model.feature_dim == {"mlp": 256, "cnn": 256, "cnn_bn": 256, "resnet18": 160}[name]


def test_resnet18_runs_on_both_input_shapes():
    model, apply = model_and_apply("resnet18")
    for in_shape in SHAPES:
        params, state = random_variables(model, in_shape, 0)
        logits, feats, _ = apply(params, state, images(4, in_shape), False)
        assert logits.shape == (4, 10) and feats.shape == (4, 160)
        assert np.isfinite(np.asarray(logits)).all()


def test_parameter_counts():
    assert resnet18_count() == EXPECTED_PARAMS[("resnet18", (32, 32, 3))]
    for (name, in_shape), expected in EXPECTED_PARAMS.items():
        params, _ = abstract_init(models.make_model(name, 10), in_shape)
        assert n_params(params) == expected, (name, in_shape)
    # the BatchNorm variant adds scale and bias per conv channel; nf scales the ResNet
    params, _ = abstract_init(models.make_model("cnn_bn", 10), (32, 32, 3))
    assert n_params(params) == EXPECTED_PARAMS[("cnn", (32, 32, 3))] + 2 * (32 + 64)
    params, state = abstract_init(models.make_model("resnet18", 100, width=8), (28, 28, 1))
    assert n_params(params) == resnet18_count(nf=8, in_ch=1, classes=100)
    # BatchNorm mean and var: stem + stage 1 have 5 BNs of nf channels, stages 2-4 have 5 each
    assert n_params(state) == 2 * (5 * 8 + 5 * 16 + 5 * 32 + 5 * 64)


def test_parameter_counts_match_the_torch_twins(torch):
    from benchmarks.torch_er import torch_model

    for (name, in_shape), expected in EXPECTED_PARAMS.items():
        net = torch_model(name, in_shape, 10)
        assert sum(p.numel() for p in net.parameters()) == expected, (name, in_shape)
        params, _ = abstract_init(models.make_model(name, 10), in_shape)
        assert n_params(params) == expected
    net = torch_model("resnet18", (28, 28, 1), 100, width=8)
    assert sum(p.numel() for p in net.parameters()) == resnet18_count(8, 1, 100)


def _flax_layers_resnet(params, state):
    """(kind, params, stats) in the order the PyTorch twin lists its layers."""
    yield "conv", params["Conv_0"], None
    stats = state["batch_stats"]
    yield "bn", params["BatchNorm_0"], stats["BatchNorm_0"]
    for b in range(8):
        p, s = params[f"BasicBlock_{b}"], stats[f"BasicBlock_{b}"]
        for k in range(3):  # conv1, bn1, conv2, bn2, [shortcut conv, shortcut bn]
            if f"Conv_{k}" in p:
                yield "conv", p[f"Conv_{k}"], None
                yield "bn", p[f"BatchNorm_{k}"], s[f"BatchNorm_{k}"]
    yield "dense", params["Dense_0"], None


def _flax_layers_cnn(params, state):
    del state
    for name in ("Conv_0", "Conv_1", "Dense_0", "Dense_1"):
        yield ("conv" if name.startswith("Conv") else "dense"), params[name], None


@pytest.mark.parametrize("name, in_shape", [("resnet18", (32, 32, 3)), ("resnet18", (28, 28, 1)),
                                            ("cnn", (28, 28, 1))])
def test_torch_twin_computes_the_same_function(name, in_shape, torch):
    """With the same weights, the twin's evaluation logits equal the ocljax model's: the twin
    really is the same network (padding, strides, pooling, flatten order)."""
    from benchmarks.torch_er import torch_model

    model, apply = model_and_apply(name)
    params, state = random_variables(model, in_shape, 1)
    net = torch_model(name, in_shape, 10).eval()
    layers = [m for m in net.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))]
    walk = _flax_layers_resnet if name == "resnet18" else _flax_layers_cnn
    flax_layers = list(walk(params, state))
    assert len(layers) == len(flax_layers)

    def t(a):
        return torch.from_numpy(np.array(a))

    with torch.no_grad():
        for layer, (kind, p, s) in zip(layers, flax_layers, strict=True):
            if kind == "conv":
                assert isinstance(layer, torch.nn.Conv2d)
                layer.weight.copy_(t(p["kernel"]).permute(3, 2, 0, 1))
                assert (layer.bias is None) == ("bias" not in p)
                if layer.bias is not None:
                    layer.bias.copy_(t(p["bias"]))
            elif kind == "bn":
                assert isinstance(layer, torch.nn.BatchNorm2d)
                layer.weight.copy_(t(p["scale"]))
                layer.bias.copy_(t(p["bias"]))
                layer.running_mean.copy_(t(s["mean"]))
                layer.running_var.copy_(t(s["var"]))
            else:
                assert isinstance(layer, torch.nn.Linear)
                layer.weight.copy_(t(p["kernel"]).T)
                layer.bias.copy_(t(p["bias"]))
        x = images(4, in_shape, seed=2)
        expected = np.asarray(apply(params, state, x, False)[0])
        got = net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_batchnorm_statistics_change_in_train_mode_only():
    model, apply = model_and_apply("resnet18")
    params, state = random_variables(model, (32, 32, 3), 0)
    x = images(4, (32, 32, 3))
    _, _, frozen = apply(params, state, x, False)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    _, _, updated = apply(params, state, x, True)
    assert jax.tree_util.tree_structure(updated) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(updated),
                    strict=True):
        assert not np.allclose(a, b)  # every mean and var of every BatchNorm moved


def test_vmap_over_members_matches_each_member():
    """Two independently drawn members under one ``vmap``, in training mode (the BatchNorm
    path: batch statistics and updated state per member) as the driver trains them."""
    train = True
    model, apply = model_and_apply("resnet18")
    members = [random_variables(model, (32, 32, 3), seed) for seed in (0, 1)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)
    x = images(4, (32, 32, 3))
    batched = jax.jit(jax.vmap(lambda p, s: model.apply(p, s, x, train)))(*stacked)
    for m, (p, s) in enumerate(members):
        single = apply(p, s, x, train)
        # atol: float32 rounding of logits near zero (batched convolutions sum differently)
        jax.tree_util.tree_map(
            lambda b, a, m=m: np.testing.assert_allclose(b[m], a, rtol=1e-5, atol=1e-5),
            batched, single)
    assert not np.allclose(batched[0][0], batched[0][1])  # the members really differ


def test_make_model_defaults_and_errors():
    assert models.make_model("resnet18", 10).feature_dim == 160
    assert models.make_model("resnet18", 10, width=8).feature_dim == 64
    assert models.make_model("mlp", 10).feature_dim == 256
    assert models.make_model("cnn", 10).feature_dim == 256
    with pytest.raises(ConfigError, match="resnet18 has a fixed depth"):
        models.make_model("resnet18", 10, depth=2)
    with pytest.raises(ConfigError, match="unknown model"):
        models.make_model("resnet50", 10)
    params, _ = abstract_init(models.make_model("mlp", 10, width=16, depth=3), (8, 8, 1))
    assert n_params(params) == 64 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 10 + 10


def test_cli_model_settings():
    from ocljax.cli import build_parser, plan
    from ocljax.run.experiment import ModelConfig

    preset = {"seeds": 1, "seed": 0, "learner": "er", "dataset": "synthetic"}

    def model_of(*argv):
        args = build_parser("t", "", preset).parse_args(list(argv))
        return plan(args, preset)[1][0].model

    assert model_of("--model", "resnet18") == ModelConfig("resnet18", None, None)
    assert model_of("--model", "resnet18", "--set", "width=24") == ModelConfig("resnet18", 24)
    assert model_of("--set", "width=64", "--set", "depth=1") == ModelConfig("mlp", 64, 1)
    with pytest.raises(ConfigError, match="width must be >= 1"):
        model_of("--set", "width=0")
    with pytest.raises(ConfigError, match="bad value"):
        model_of("--set", "width=wide")
    assert model_of("--set", "input_norm=standard").input_norm == "standard"
    with pytest.raises(ConfigError, match="unknown input_norm 'zscore'"):
        model_of("--set", "input_norm=zscore")
    assert model_of("--set", "init=torch").init == "torch"
    with pytest.raises(ConfigError, match="unknown init 'xavier'"):
        model_of("--set", "init=xavier")


def test_torch_initialisation_is_pytorchs_uniform_default():
    """Every kernel and its bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan-in over all but the
    last kernel dimension, so kh * kw * C_in for a convolution); BatchNorm parameters are kept;
    the same key gives the same draw and another key another."""
    x = np.zeros((2, 8, 8, 1), np.uint8)
    model = models.torch_initialised(models.small_cnn(10, channels=8, width=32,
                                                      batch_norm=True))
    params, state = model.init(jax.random.PRNGKey(0), x)
    plain, plain_state = models.small_cnn(10, channels=8, width=32, batch_norm=True).init(
        jax.random.PRNGKey(0), x)
    layers = [p for p in jax.tree.leaves(
        params, is_leaf=lambda t: isinstance(t, dict) and "kernel" in t) if isinstance(p, dict)]
    assert len(layers) == 4  # two convolutions, two dense layers
    for layer in layers:
        kernel = np.asarray(layer["kernel"])
        bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)
        if "bias" in layer:
            bias = np.asarray(layer["bias"])
            assert np.abs(bias).max() <= bound and np.abs(bias).std() > 0
    for name in params:
        if name.startswith("BatchNorm"):
            chex.assert_trees_all_equal(params[name], plain[name])
    chex.assert_trees_all_equal(state, plain_state)
    again, _ = model.init(jax.random.PRNGKey(0), x)
    other, _ = model.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal(again, params)
    assert not np.allclose(other["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_channel_stats_are_the_pools_pixel_mean_and_std():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5000, 30, 30, 2), dtype=np.uint8)  # several chunks
    x[..., 1] //= 4  # channels with different statistics
    mean, std = models.channel_stats(x)
    flat = x.reshape(-1, 2) / 255.0
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-8)
    const = np.full((10, 2, 2, 1), 7, np.uint8)  # a constant channel: centred, std taken as 1
    mean, std = models.channel_stats(const)
    assert mean == pytest.approx((7 / 255,)) and std == (1.0,)


def test_standardized_model_sees_standardized_inputs():
    """The wrapped network gets (x / 255 - mean) / std per channel, for uint8 and for [0, 1]
    float inputs alike (an attack's or augmentation's output), and nothing else changes."""
    seen = []

    def apply(params, state, x, train):
        seen.append(x)
        return x.reshape(x.shape[0], -1) @ params, x, state

    inner = models.mlp(4, (8,))._replace(init=lambda key, x: (jnp.ones((8, 4)), {}),
                                          apply=apply)
    mean, std = (0.2, 0.5), (0.1, 0.4)
    model = models.standardized(inner, mean, std)
    x = np.random.default_rng(1).integers(0, 256, size=(3, 2, 2, 2), dtype=np.uint8)
    want = (x / 255.0 - np.array(mean)) / np.array(std)
    params, state = model.init(jax.random.PRNGKey(0), x)
    for inputs in (x, jnp.asarray(x / 255.0, jnp.float32)):
        logits, _, _ = model.apply(params, state, inputs, False)
        np.testing.assert_allclose(seen[-1], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits, want.reshape(3, -1) @ np.ones((8, 4)), rtol=1e-5)
    with pytest.raises(ValueError, match="positive std"):
        models.standardized(inner, (0.1,), (0.0,))
    from ocljax import precision  # bf16 (as experiments stack them): standardised in float32,
    # then cast, so the pixels are not rounded to bf16 first

    models.standardized(precision.cast_model(inner, "bf16"), mean, std).apply(
        params, state, x, False)
    assert seen[-1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(seen[-1], np.float32),
                               np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32))


def test_runs_checkpointed_before_the_new_model_settings_still_resume():
    from ocljax.run.experiment import ModelConfig, model_fingerprint

    old = {"name": "mlp", "width": None, "depth": None, "precision": "float32"}
    assert model_fingerprint(ModelConfig()) == old
    assert model_fingerprint(ModelConfig(init="torch")) == {**old, "init": "torch"}


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet18"])
def test_torch_loop_runs_each_model(model, torch):
    from benchmarks import torch_er

    rng = np.random.default_rng(0)
    train_x, test_x = images(40, (32, 32, 3), 0), images(30, (32, 32, 3), 1)
    train_y, test_y = rng.integers(0, 4, 40), rng.integers(0, 4, 30)
    order = rng.permutation(40).reshape(4, 10)
    out = torch_er.run(train_x, train_y, test_x, test_y, order, {2, 4}, buffer_size=15,
                       model=model, max_steps=2 if model != "mlp" else None)
    assert out["steps"] == (4 if model == "mlp" else 2) and out["device"] == "cpu"
    assert out["samples"] == 10 * out["steps"]
    assert np.isfinite(out["seconds"]) and 0.0 <= out["final_test_accuracy"] <= 1.0
    # a prefix that reaches no task end is evaluated once after the clock stops
    out = torch_er.run(train_x, train_y, test_x, test_y, order, {4}, model=model, max_steps=1)
    assert out["steps"] == 1 and 0.0 <= out["final_test_accuracy"] <= 1.0


@pytest.mark.parametrize("kernel,stride,padding,size", [
    ((3, 3), (1, 1), "SAME", 8), ((3, 3), (2, 2), 1, 8), ((3, 3), (2, 2), "SAME", 7),
    ((1, 1), (2, 2), "VALID", 8), ((3, 3), (1, 1), "VALID", 5),
])
def test_matmul_convolution_equals_xla_convolution(kernel, stride, padding, size):
    from ocljax.models.conv import Conv

    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
    mods = {impl: Conv(4, kernel, stride, padding, impl=impl)
            for impl in ("xla", "matmul", "canonical")}
    params = mods["xla"].init(jax.random.PRNGKey(1), x)
    outs, grads = {}, {}
    for impl, mod in mods.items():
        outs[impl] = mod.apply(params, x)
        grads[impl] = jax.grad(lambda p, x, mod=mod: (mod.apply(p, x) ** 2).sum(),
                               argnums=(0, 1))(params, x)
    for impl in ("matmul", "canonical"):
        np.testing.assert_allclose(outs[impl], outs["xla"], rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["xla"]),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _conv_grads_under_vmap(conv):
    """Gradients of a squared-output loss through ``conv(x, k)`` under the ways the library
    maps it: members (kernel and input per member), a shared kernel (input mapped), per-sample
    gradients, and a nest of the two."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 7, 7, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 8, 5))

    def grad(argnums):
        return jax.grad(lambda x, k: (conv(x, k) ** 2).sum(), argnums)

    return {
        "members": jax.vmap(grad((0, 1)))(x, k),
        "shared kernel": jax.vmap(grad((0, 1)), (0, None))(x, k[0]),
        "per sample": jax.vmap(lambda xi: grad(1)(xi[None], k[0]))(x[0]),
        "nested": jax.vmap(jax.vmap(grad((0, 1)), (0, None)), (None, 0))(x, k),
        "values": jax.vmap(conv)(x, k),
    }


@pytest.mark.parametrize("stride,padding", [((1, 1), ((1, 1), (1, 1))), ((2, 2), ((0, 1), (0, 1)))])
def test_canonical_convolution_is_exact_under_vmap_and_per_sample_gradients(stride, padding):
    from ocljax.models.conv import DIMS, canonical_conv

    ref = _conv_grads_under_vmap(lambda x, k: jax.lax.conv_general_dilated(
        x, k, stride, padding, dimension_numbers=DIMS))
    got = _conv_grads_under_vmap(lambda x, k: canonical_conv(x, k, stride, padding))
    for way in ref:
        for a, b in zip(jax.tree.leaves(ref[way]), jax.tree.leaves(got[way]), strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-4, err_msg=way)


def _scanned_step_hlo(impl: str) -> str:
    """Optimized HLO of three SGD steps of a two-convolution network in a ``lax.scan``."""
    from flax import linen as nn

    from ocljax.models.conv import Conv

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(Conv(8, (3, 3), impl=impl)(x))
            h = nn.relu(Conv(8, (3, 3), strides=(2, 2), impl=impl)(h))
            return h.mean((1, 2))

    net = Net()
    xs = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8, 8, 8))
    params = net.init(jax.random.PRNGKey(1), xs[0])

    def run(params):
        def step(p, x):
            g = jax.grad(lambda p: (net.apply(p, x) ** 2).sum())(p)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

        return jax.lax.scan(step, params, xs)[0]

    return jax.jit(run).lower(params).compile().as_text()


def test_canonical_convolutions_keep_nhwc_hwio_inside_a_loop():
    # what the canonical implementation is for: in a loop body every convolution of the
    # forward and backward pass keeps the NHWC / HWIO dimensions of XLA:CPU's fast path
    import re

    labels = re.findall(r"dim_labels=([\w>-]+)", _scanned_step_hlo("canonical"))
    assert len(labels) >= 5  # two forward, one input gradient (the first needs none), two kernel
    assert set(labels) == {"b01f_01io->b01f"}, labels


def test_auto_convolution_on_cpu_is_matmul_for_few_channels_and_canonical_otherwise():
    from ocljax.models.conv import MATMUL_BELOW_CHANNELS, Conv

    def primitives(channels):
        x = jnp.ones((2, 6, 6, channels))
        mod = Conv(4, (3, 3))
        params = mod.init(jax.random.PRNGKey(0), x)
        return [e.primitive.name for e in jax.make_jaxpr(lambda p: mod.apply(p, x))(params).eqns]

    assert jax.default_backend() == "cpu"
    assert "dot_general" in primitives(3)  # an RGB input: patches and a matmul
    assert "custom_vjp_call" not in primitives(3)
    assert primitives(MATMUL_BELOW_CHANNELS)[0] == "custom_vjp_call"  # canonical_conv


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4)])
def test_max_pool_2x2_equals_flax_max_pool_with_ties_to_the_bit(shape):
    from flax import linen as nn

    from ocljax.models.cnn import max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    x = jnp.round(x * 2) / 2  # many ties inside windows
    x = x.at[0, 0, 0, 0].set(x[0, 0, 1, 0])  # at least one tie for sure
    w = jax.random.normal(jax.random.PRNGKey(1), (shape[1] // 2, shape[2] // 2, shape[3]))

    def loss(pool, x):
        return (pool(jax.nn.relu(x)) * w).sum()

    ref = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
    np.testing.assert_array_equal(jax.grad(loss, 1)(max_pool_2x2, x), jax.grad(loss, 1)(ref, x))
    # the gradient of a tied window goes to one position only
    g = jax.grad(lambda x: max_pool_2x2(x).sum())(jnp.ones((1, 2, 2, 1)))
    np.testing.assert_array_equal(g[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
