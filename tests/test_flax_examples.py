"""tap_linen / tap_nnx with "*" on small copies of the models of Flax's examples, written
the way those examples write them (a ResNet with BatchNorm, the SST-2 classifier with an
nn.scan LSTM, an LM1B-style decoder, the nnx MNIST CNN), unmodified: every submodule's
output gradient checked by finite differences in float64 (a random direction added to
the module's output through flax's own method interception, or an nnx subclass)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fgrad

EPS = 1e-5


def check_directional(loss_with, grads, shapes, seed=0):
    """``loss_with(deltas)`` is the loss with ``deltas[path]`` added to each module's
    output value (the same delta at every step of a scan). For each tapped path, a random
    direction v: central difference of the loss along v equals <gradient, v> (summed over
    steps for a tap inside a scan)."""
    rng = np.random.default_rng(seed)
    f = jax.jit(loss_with)
    zero = {p: jax.tree.map(jnp.zeros_like, s) for p, s in shapes.items()}
    assert set(grads) <= set(shapes), set(grads) - set(shapes)
    for path, g in grads.items():
        leaves, tree = jax.tree.flatten(shapes[path])
        v = tree.unflatten([jnp.asarray(rng.normal(size=s.shape)) for s in leaves])
        plus = dict(zero, **{path: jax.tree.map(lambda x: EPS * x, v)})
        minus = dict(zero, **{path: jax.tree.map(lambda x: -EPS * x, v)})
        fd = (f(plus) - f(minus)) / (2 * EPS)

        def dot(gl, vl):
            if gl.shape != vl.shape:  # per-step gradients of a tap inside a scan
                gl = gl.sum(0)
            return jnp.sum(gl * vl)

        an = sum(jax.tree.leaves(jax.tree.map(dot, g, v)))
        np.testing.assert_allclose(an, fd, rtol=1e-6, atol=1e-9, err_msg=path)


def is_lstm(path):
    """An LSTM cell, or the nn.scan over one: it returns ((c, h), h)."""
    return path.endswith(("_lstm", "OptimizedLSTMCell_0"))


# A tap (like retain_grad) counts every use of a value; the cell's new c is used inside the
# cell too (new h = o * tanh(new c)), where adding a delta to the cell's output cannot
# reach. The cells' activation function therefore adds the c delta on its second call of
# each step (its first is the candidate g), keyed by the LSTM's name; tanh otherwise.
_CELL_C_DELTA: dict = {}
_CELL_CALLS: dict = {}


def cell_tanh(lstm, x):
    _CELL_CALLS[lstm] = _CELL_CALLS.get(lstm, 0) + 1
    if _CELL_CALLS[lstm] % 2 == 0 and lstm in _CELL_C_DELTA:
        x = x + _CELL_C_DELTA[lstm].astype(x.dtype)
    return jnp.tanh(x)


def linen_shapes_and_perturbed(apply):
    """The output shapes of every submodule's __call__ (one step's, inside a scan), and
    ``apply`` with deltas added to chosen outputs."""

    def with_deltas(deltas, *args, **kwargs):
        _CELL_C_DELTA.clear()
        for path, d in deltas.items():
            if is_lstm(path):
                lstm = next(seg for seg in path.split("/") if seg.endswith("_lstm"))
                c = jax.tree.leaves(d)[0]
                _CELL_C_DELTA[lstm] = _CELL_C_DELTA[lstm] + c if lstm in _CELL_C_DELTA else c
        try:
            return _with_deltas(deltas, *args, **kwargs)
        finally:
            _CELL_C_DELTA.clear()

    def _with_deltas(deltas, *args, **kwargs):
        def interceptor(next_fun, a, k, ctx):
            out = next_fun(*a, **k)
            path = "/".join(ctx.module.path)
            if ctx.method_name == "__call__" and path in deltas:
                leaves, tree = jax.tree.flatten(out)
                ds = tree.flatten_up_to(deltas[path])
                if is_lstm(path):  # ((c, h), h): one h, in two places; it gets both deltas
                    ds = [ds[0], ds[1] + ds[2], ds[1] + ds[2]]
                out = tree.unflatten(
                    [o + d.astype(o.dtype) for o, d in zip(leaves, ds, strict=True)]
                )
            return out

        with nn.intercept_methods(interceptor):
            return apply(*args, **kwargs)

    def shapes(*args, **kwargs):
        seen = {}

        def interceptor(next_fun, a, k, ctx):
            out = next_fun(*a, **k)
            path = "/".join(ctx.module.path)
            if ctx.method_name == "__call__" and path:
                seen[path] = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out)
            return out

        with nn.intercept_methods(interceptor):
            jax.eval_shape(lambda *a: apply(*a, **kwargs), *args)
        return seen

    return shapes, with_deltas


# --- the SST-2 classifier: embedding, bidirectional LSTM by nn.scan, attention, MLP -------


class LSTM(nn.Module):
    hidden: int

    @functools.partial(
        nn.scan, variable_broadcast="params", in_axes=1, out_axes=1, split_rngs={"params": False}
    )
    @nn.compact
    def __call__(self, carry, x):
        tanh = functools.partial(cell_tanh, self.name)
        return nn.OptimizedLSTMCell(self.hidden, param_dtype=jnp.float64, activation_fn=tanh)(
            carry, x
        )

    def initialize_carry(self, shape):
        cell = nn.OptimizedLSTMCell(self.hidden, param_dtype=jnp.float64, parent=None)
        return cell.initialize_carry(jax.random.key(0), shape)


class BiLSTM(nn.Module):
    hidden: int

    def setup(self):
        self.forward_lstm = LSTM(self.hidden)
        self.backward_lstm = LSTM(self.hidden)

    def __call__(self, xs):
        _, fwd = self.forward_lstm(self.forward_lstm.initialize_carry(xs[:, 0].shape), xs)
        rev = xs[:, ::-1]
        _, bwd = self.backward_lstm(self.backward_lstm.initialize_carry(rev[:, 0].shape), rev)
        return jnp.concatenate([fwd, bwd[:, ::-1]], -1)


class Attention(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, keys):
        energy = nn.tanh(nn.Dense(self.hidden, name="keys", use_bias=False)(keys))
        scores = nn.Dense(1, name="energy", use_bias=False)(energy).squeeze(-1)
        return nn.softmax(scores, axis=-1)


class Classifier(nn.Module):
    vocab: int
    emb: int
    hidden: int

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.1), (self.vocab, self.emb), jnp.float64
        )
        self.encoder = BiLSTM(self.hidden)
        self.attention = Attention(self.hidden)
        self.intermediate = nn.Dense(self.hidden)
        self.output_layer = nn.Dense(2, use_bias=False)

    def __call__(self, ids):
        enc = self.encoder(self.embedding[ids])
        context = (self.attention(enc)[:, None] @ enc).squeeze(1)
        return self.output_layer(nn.tanh(self.intermediate(context)))


# --- a ResNet with BatchNorm, as the ImageNet example writes it ---------------------------


class ResNetBlock(nn.Module):
    filters: int
    conv: type
    norm: type
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.ones)(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: tuple = (1, 1)
    filters: int = 4
    classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, param_dtype=jnp.float64)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            param_dtype=jnp.float64,
        )
        x = conv(self.filters, (3, 3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.filters * 2**i, conv, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.classes, param_dtype=jnp.float64)(x)


# --- an LM1B-style decoder: shared embedding, positional embedding, causal attention ------


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Dense(self.mlp_dim, param_dtype=jnp.float64)(x))
        return nn.Dense(x.shape[-1], param_dtype=jnp.float64)(y)


class DecoderBlock(nn.Module):
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm(param_dtype=jnp.float64)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, param_dtype=jnp.float64, deterministic=True
        )(y, mask=mask)
        x = x + y
        z = nn.LayerNorm(param_dtype=jnp.float64)(x)
        return x + MlpBlock(self.mlp_dim)(z)


class Decoder(nn.Module):
    vocab: int = 7
    emb: int = 4
    layers: int = 1

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.emb, param_dtype=jnp.float64, name="embed")
        x = embed(ids)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, ids.shape[1], self.emb), jnp.float64
        )
        x = x + pos
        mask = nn.make_causal_mask(ids)
        for i in range(self.layers):
            x = DecoderBlock(2, 8, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(param_dtype=jnp.float64, name="final_norm")(x)
        return embed.attend(x)  # logits with the shared embedding


def _linen_case(model, x, init_kwargs, apply_kwargs, mutable=False):
    # Random float64 weights drawn from the shapes init gives (tracing init only: running
    # it compiles a random-number program per model); BatchNorm's running variance
    # positive, its running mean away from 0 so that no ReLU input is exactly 0 (a kink
    # finite differences cannot cross).
    shapes = jax.eval_shape(functools.partial(model.init, **init_kwargs), jax.random.key(0), x)
    rng = np.random.default_rng(7)

    def draw(path, s):
        if "var" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape))
        return jnp.asarray(rng.normal(0.0, 0.4, s.shape))

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    apply = functools.partial(model.apply, mutable=["batch_stats"]) if mutable else model.apply
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(8,)))

    def loss_of(out):
        out = out[0] if mutable else out
        return jnp.sum(jnp.tanh(out) * weights[: out.shape[-1]])

    return variables, apply, loss_of


@pytest.mark.parametrize("name", ["sst2", "resnet", "lm1b"])
def test_every_submodule_gradient_by_finite_differences(name):
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        if name == "sst2":
            model, x = Classifier(10, 4, 3), jnp.array([[1, 4, 2], [5, 9, 0]])
            variables, apply, loss_of = _linen_case(model, x, {}, {})
            kwargs = {}
        elif name == "resnet":  # inference: BatchNorm's running statistics
            model = ResNet()
            x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)))
            variables, apply, loss_of = _linen_case(model, x, {"train": False}, {})
            kwargs = {"train": False}
        else:
            model, x = Decoder(), jnp.array([[1, 4, 2, 6], [5, 0, 3, 3]])
            variables, apply, loss_of = _linen_case(model, x, {}, {})
            kwargs = {}
        loss = lambda v, x: loss_of(fgrad.tap_linen(apply, "*")(v, x, **kwargs))
        grads = jax.jit(fgrad.grad_intermediates(loss))(variables, x)
        shapes, with_deltas = linen_shapes_and_perturbed(apply)
        s = shapes(variables, x, **kwargs)
        assert len(grads) >= 8, sorted(grads)
        float_paths = {
            p
            for p, t in s.items()
            if all(jnp.issubdtype(l.dtype, jnp.floating) for l in jax.tree.leaves(t))
        }
        assert set(grads) == float_paths
        check_directional(lambda d: loss_of(with_deltas(d, variables, x, **kwargs)), grads, s)


# --- nnx: the MNIST-example CNN -----------------------------------------------


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs, param_dtype=jnp.float64)
        self.conv2 = nnx.Conv(4, 4, kernel_size=(3, 3), rngs=rngs, param_dtype=jnp.float64)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(4 * 2 * 2, 8, rngs=rngs, param_dtype=jnp.float64)
        self.linear2 = nnx.Linear(8, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


def test_nnx_cnn_every_submodule_gradient_by_finite_differences():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        # random float64 weights on the model's shapes (building it eagerly compiles a
        # random-number program per layer)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0))))
        rng = np.random.default_rng(5)
        state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.4, s.shape)), state)
        model = nnx.merge(graphdef, state)
        x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 1)))
        w = jnp.asarray(np.random.default_rng(4).normal(size=(3,)))
        loss_of = lambda out: jnp.sum(jnp.tanh(out) * w[: out.shape[-1]])
        grads = jax.jit(fgrad.grad_intermediates(fgrad.tap_nnx(lambda m, x: loss_of(m(x)), "*")))(
            model, x
        )
        mods = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if p and callable(m)}
        assert set(grads) == set(mods)
        # reference: each module's output shifted by a delta, through an independent subclass
        deltas_now: dict = {}
        swapped = {}
        for path, m in mods.items():
            cls = type(m)
            sub = type(
                cls.__name__,
                (cls,),
                {
                    "__call__": lambda self, *a, _c=cls, _p=path: (
                        _c.__call__(self, *a) + deltas_now[_p]
                    )
                },
            )
            swapped[path] = (m, cls, sub)

        def loss_with(d):
            deltas_now.clear()
            deltas_now.update(d)
            for m, _, sub in swapped.values():
                object.__setattr__(m, "__class__", sub)
            try:
                return loss_of(model(x))
            finally:
                for m, cls, _ in swapped.values():
                    object.__setattr__(m, "__class__", cls)

        shapes = {p: jax.ShapeDtypeStruct(g.shape, g.dtype) for p, g in grads.items()}
        check_directional(loss_with, grads, shapes)
