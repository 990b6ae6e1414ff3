"""``optimizer.step()`` for optax, with ``torch.optim``'s per-parameter rules.

``torch.optim`` keeps its state per parameter and skips every parameter whose ``.grad`` is
``None``: no update, no weight decay, no change to its momentum or Adam moments, and its
own step count (Adam's bias correction) does not advance. optax updates every leaf it is
given and keeps one step count for the whole tree. `step` gives optax torch's rules for
any optax optimizer, wrappers included:

- The optimizer sees only the leaves that have a gradient: the others are replaced by
  ``optax.MaskedNode`` in the gradients, the parameters and every parameter-shaped part
  of the state (momenta, moments, accumulated gradients, factored moments), so
  ``clip_by_global_norm`` measures the gradients that exist
  (``torch.nn.utils.clip_grad_norm_`` skips ``None`` grads) and
  ``masked``/``multi_transform`` route what is left. Leaves without a gradient come back
  bit for bit, state included.
- Bias-correction step counts (the ``count`` of a state holding a second moment ``nu``:
  Adam, AdamW, NAdam, RAdam, AMSGrad, AdaBelief, RMSprop with bias correction, ...),
  which torch keeps per parameter (``state[p]["step"]``), are kept once *per parameter*
  in `StepState.per_param`, and parameter ``i`` is updated by a run of the optimizer that
  sees its own count: a head first used at step 3 gets the bias correction of its first
  step, as in ``torch.optim.Adam``. Parameters with the same history share one count and
  one optimizer run, so a model whose every parameter always has a gradient costs one
  run, as with optax alone.
- What torch keeps once per optimizer stays global and advances at every step, whether
  or not any parameter has a gradient: a learning-rate schedule's count (a torch LR
  scheduler), injected hyperparameters, `MultiSteps`' counters (a loop that calls
  ``optimizer.step()`` every ``k`` micro-batches).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fgrad import _checks
from fgrad._grads import Trainable, check_grads, is_empty, is_hole, trainable_mask
from fgrad._typing import PyTree


@jax.tree_util.register_pytree_node_class
class StepState:
    """`fgrad.step`'s optimizer state: optax's state with per-parameter counts.

    Attributes:
      inner: the optax state (``optimizer.init(params)``'s structure). Its
        parameter-shaped parts (momenta, Adam's ``mu`` and ``nu``, accumulated gradients)
        are exact per parameter, and so are its global leaves (schedule counts, injected
        hyperparameters, `MultiSteps`' counters); its bias-correction counts keep their
        initial values, since those live per parameter (see ``per_param``).
      per_param: a pytree shaped like the parameters: for each parameter, a tuple of its
        bias-correction step counts (e.g. Adam's ``count``), as that parameter's own
        optimizer sees them: ``torch.optim``'s ``state[p]["step"]``.

    Hyperparameters injected with ``optax.inject_hyperparams`` are global, as in
    ``inner``: change one as with optax, e.g.
    ``state.inner.hyperparams["learning_rate"] = 0.01``.

    Parameters whose histories agree (every one, until some step leaves one out) share
    one copy (``rests[k]`` for the parameters of ``groups`` equal to ``k``), so `step`
    runs the optimizer once per group of parameters, not once per parameter. The groups
    are static (part of the pytree structure): a step that splits a group changes the
    structure, and ``jit`` retraces once.
    """

    __slots__ = ("groups", "inner", "present", "rests", "treedef")

    def __init__(
        self, inner: Any, rests: tuple, groups: tuple, treedef: Any, present: tuple | None = None
    ):
        self.inner, self.rests, self.groups, self.treedef = inner, rests, groups, treedef
        self.present = present

    def tree_flatten(self):
        return (self.inner, self.rests), (self.groups, self.treedef, self.present)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], *aux)

    @property
    def per_param(self) -> Any:
        return self.treedef.unflatten([self.rests[k] for k in self.groups])

    def __repr__(self) -> str:
        return f"StepState(inner={self.inner!r}, per_param={self.per_param!r})"


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _param_shaped(p_tree: Any, p_leaves: list) -> Any:
    """A predicate: is a subtree of the state kept per parameter (a momentum, a moment, an
    accumulated gradient, adafactor's factored ``v_row``/``v_col``, novograd's per-leaf
    scalar, sm3's list of per-axis accumulators), i.e. shaped like the parameters' tree
    with an array (of any shape), or a list of arrays, at each parameter,
    ``optax.MaskedNode``/``None`` standing for any parameter?"""
    single = p_tree.num_nodes == 1

    def check(x: Any) -> bool:
        try:
            parts = p_tree.flatten_up_to(x)
        except (ValueError, TypeError):
            return False
        for part, p in zip(parts, p_leaves, strict=True):
            if part is None or isinstance(part, optax.MaskedNode):
                continue
            if not _is_array(part) and not (
                type(part) in (list, tuple) and all(_is_array(a) for a in part)
            ):
                return False  # a subtree (e.g. chain's tuple of states), not a leaf's
            if single and (
                not _is_array(part)
                or jnp.shape(part) != jnp.shape(p)
                or not jnp.issubdtype(part.dtype, jnp.inexact)
            ):
                return False  # a lone parameter: only its own shape tells it from a count
        return True

    return check


def _check_optimizer(optimizer: Any, caller: str) -> None:
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        return
    if callable(optimizer):
        name = getattr(optimizer, "__qualname__", type(optimizer).__name__)
        module = getattr(optimizer, "__module__", "") or ""
        shown = f"optax.{name}" if module.startswith("optax") else name
        raise TypeError(
            f"{caller}: optimizer must be an optax.GradientTransformation (with .init and "
            f".update), got the function {shown} itself. Call it first, e.g. "
            f"{shown}(learning_rate=1e-3)."
        )
    raise TypeError(
        f"{caller}: optimizer must be an optax.GradientTransformation (with .init and "
        f".update), got {type(optimizer).__name__}."
    )


def _check_state(optimizer: Any, params: Any, opt_state: Any, caller: str) -> Any:
    """The optax state inside ``opt_state``, checked against ``optimizer.init(params)``."""
    with jax.numpy_dtype_promotion("standard"):
        expected = jax.eval_shape(optimizer.init, params)
    inner = opt_state.inner if isinstance(opt_state, StepState) else opt_state
    hint = (
        "Pass optimizer.init(params), or the state a previous fgrad.step returned, for this "
        "optimizer and these params."
    )
    where = _checks.first_structure_difference(expected, inner)
    if where is not None:
        raise ValueError(
            f"{caller}: opt_state does not belong to this optimizer and these params: in "
            f"the state optimizer.init(params) would make, opt_state{where}. It comes from "
            f"another optimizer or another params tree. {hint}"
        )
    if isinstance(opt_state, StepState) and opt_state.treedef != jax.tree.structure(params):
        raise ValueError(
            f"{caller}: opt_state.per_param is not shaped like params: the state comes from "
            f"another params tree. {hint}"
        )
    return inner


def step(
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    grads: PyTree,
    *,
    trainable: Trainable = None,
    **update_kwargs: Any,
) -> tuple[Any, StepState]:
    """``optimizer.step()``: an optax update with ``torch.optim``'s per-parameter rules.

    As in ``torch.optim``, a parameter without a gradient (``None``, frozen, or
    `fgrad.NoGrad`, not reached by any loss since `fgrad.zero_grad`) gets no update at
    all: not the step, not weight decay, and its optimizer state (momentum, Adam moments,
    its own step count) keeps its value bit for bit. Every other parameter gets the
    update optax computes on the parameters that have a gradient, with its own step
    count: for parameter ``θ`` first used at step ``t₀``, Adam's bias correction uses
    ``t - t₀ + 1``, as ``torch.optim.Adam``'s ``state[θ]["step"]``. Gradient clipping
    inside the optimizer (``optax.clip_by_global_norm``) sees only the gradients that
    exist, as ``torch.nn.utils.clip_grad_norm_`` does. Wrappers (``optax.masked``,
    ``multi_transform``, ``chain``, ``inject_hyperparams``, ``MultiSteps``) are handled
    through the state's structure. Bias-correction step counts are per parameter; what
    torch keeps per optimizer (a schedule's count, as an LR scheduler's; injected
    hyperparameters; ``MultiSteps``' micro-step counter, as a loop stepping every ``k``
    micro-batches) is global and advances every step. Under ``MultiSteps`` a parameter
    may gain a gradient mid-window (it then gets the window's sum over ``k``, as torch's
    ``(loss / k).backward()``), but one that had a gradient in an earlier micro-step of
    the window and has none later is refused with an error (under ``jit``, raised when
    the step runs): accumulate with `fgrad.backward` instead.

    Complex parameters: with PyTorch's ``.grad`` (`fgrad.backward`'s), optax's SGD (with
    momentum) equals ``torch.optim.SGD``. Adam differs between the two: optax's second
    moment of a complex gradient is ``|g|²`` (one number per complex entry), while
    ``torch.optim.Adam`` treats a complex tensor as its real and imaginary parts
    (``torch.view_as_real``), each with its own second moment.

    Args:
      optimizer: an ``optax.GradientTransformation`` (``optax.adam(1e-3)``, not
        ``optax.adam``), or ``optax.MultiSteps``.
      params: the parameters.
      opt_state: ``optimizer.init(params)``, or the `StepState` a previous ``step``
        returned. (Start a ``lax.scan`` over steps from the state of one ``step``
        taken before the scan, since that call may turn optax's state into a
        `StepState`: see Returns and the example.)
      grads: the accumulator (`fgrad.zero_grad`, `fgrad.backward`, `fgrad.accumulate`):
        arrays, ``None`` at frozen leaves, `fgrad.NoGrad` where no loss reached a leaf.
      trainable: optionally, which leaves are trainable (as in `fgrad.zero_grad`); a
        gradient given for a leaf marked frozen is then an error.
      **update_kwargs: extra keyword arguments of ``optimizer.update``, e.g.
        ``value=loss`` for ``optax.polyak_sgd``.

    Returns:
      ``(params, opt_state)`` after the update. ``opt_state`` is optax's own state (same
      structure, so it can be a ``lax.scan`` carry) while every leaf left out is frozen
      (``None``), or while the optimizer keeps no per-parameter step count (SGD,
      schedules, injected hyperparameters): their moving counterparts then share one
      step count. Once a trainable leaf is left out (`fgrad.NoGrad`) under an optimizer
      with bias-correction counts or ``MultiSteps``, or when given one, it is a
      `StepState` with per-parameter step counts; a ``lax.scan`` carry that starts from
      ``optimizer.init(params)`` then fails with JAX's "scan body function carry
      input and carry output must have equal types": start the scan from the state one
      ``step`` returned for the same pattern of gradients instead (last example).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import fgrad
      >>> params = {"frozen": jnp.ones(2), "w": jnp.ones(2)}
      >>> opt = optax.adamw(0.1, weight_decay=0.5)
      >>> grads = {"frozen": None, "w": jnp.array([1.0, -1.0])}
      >>> new, state = fgrad.step(opt, params, opt.init(params), grads)
      >>> new["frozen"]  # untouched: no step, no weight decay
      Array([1., 1.], dtype=float32)
      >>> [round(float(v), 4) for v in new["w"]]  # 1 - 0.1 * (±1 + 0.5 * 1)
      [0.85, 1.05]
      >>> grads = {"frozen": None, "w": fgrad.NoGrad()}  # "w": no gradient this step
      >>> _, state = fgrad.step(opt, new, state, grads)
      >>> int(state.per_param["w"][0])  # w's own Adam step count did not advance
      1

      A ``lax.scan`` over steps starts from the state of a step taken before it with
      the same pattern of gradients:

      >>> import jax
      >>> g = {"frozen": None, "w": jnp.array([1.0, -1.0])}
      >>> def body(carry, _):
      ...     return fgrad.step(opt, *carry, g), None
      >>> carry = fgrad.step(opt, new, state, g)
      >>> (p, s), _ = jax.lax.scan(body, carry, None, length=3)
      >>> int(s.per_param["w"][0])  # 1 + 1 + 3
      5
    """
    caller = "fgrad.step"
    _check_optimizer(optimizer, caller)
    check_grads(params, grads, caller)
    if trainable is not None:
        mask = trainable_mask(params, trainable, caller)
        for (path, g), m in zip(
            jax.tree_util.tree_leaves_with_path(grads, is_leaf=is_hole),
            jax.tree.leaves(mask),
            strict=True,
        ):
            if not is_hole(g) and not m:
                raise ValueError(
                    f"{caller}: grads{jax.tree_util.keystr(path)} holds a gradient but the "
                    "leaf is frozen (trainable is False there). Build the accumulator with "
                    "fgrad.zero_grad(params, trainable=...) so frozen leaves stay None."
                )
    inner = _check_state(optimizer, params, opt_state, caller)

    p_tree: Any  # PyTreeDef (its methods are untyped for mypy)
    sdef: Any
    p_leaves, p_tree = jax.tree.flatten(params)
    g_leaves = p_tree.flatten_up_to(
        jax.tree.map(lambda g: None if is_hole(g) else g, grads, is_leaf=is_hole)
    )
    shaped = _param_shaped(p_tree, p_leaves)
    with_paths, sdef = jax.tree_util.tree_flatten_with_path(inner, is_leaf=shaped)
    elems = [e for _, e in with_paths]
    slot_at = [k for k, e in enumerate(elems) if shaped(e)]
    count_at = [
        k for k, (path, e) in enumerate(with_paths) if not shaped(e) and _is_step_count(inner, path)
    ]
    glob_at = [k for k, e in enumerate(elems) if not shaped(e) and k not in count_at]
    present = [g is not None for g in g_leaves]
    if isinstance(opt_state, StepState) and count_at:
        rests, groups = opt_state.rests, opt_state.groups
    else:  # every parameter starts from the shared counts (or there are none)
        rests, groups = (tuple(elems[k] for k in count_at),), (0,) * len(p_leaves)
    before = opt_state.present if isinstance(opt_state, StepState) else None
    nograd = [
        is_empty(g) for g in p_tree.flatten_up_to(jax.tree.map(lambda g: g, grads, is_leaf=is_hole))
    ]
    multisteps = _check_multisteps(inner, before, nograd, params, caller)
    slots = {k: p_tree.flatten_up_to(elems[k]) for k in slot_at}

    masked = lambda vals, on: p_tree.unflatten(
        [v if h else optax.MaskedNode() for v, h in zip(vals, on, strict=True)]
    )
    g_in = masked(
        [None if g is None else g.astype(p.dtype) for g, p in zip(g_leaves, p_leaves, strict=True)],
        present,
    )
    p_in = masked(p_leaves, present)
    new_slots = {k: list(v) for k, v in slots.items()}
    new_p = list(p_leaves)
    new_globs: list | None = None

    def run(rest: tuple, on: list) -> tuple:
        e = list(elems)
        for j in slot_at:
            e[j] = masked(slots[j], on)
        for r, j in enumerate(count_at):
            e[j] = rest[r]
        # optax's own arithmetic (e.g. Adam's bias correction, a Python float to the
        # power of an int32 count) needs standard promotion, even where the caller is strict.
        with jax.numpy_dtype_promotion("standard"):
            try:
                updates, new_inner = optimizer.update(
                    g_in if on is present else masked(g_in_leaves, on),
                    sdef.unflatten(e),
                    p_in if on is present else masked(p_leaves, on),
                    **update_kwargs,
                )
            except TypeError as err:
                if "argument" not in str(err):
                    raise
                raise TypeError(
                    f"{caller}: optimizer.update(grads, state, params"
                    + "".join(f", {k}=..." for k in update_kwargs)
                    + f") failed: {err}. An optimizer whose update needs more arguments "
                    "(e.g. optax.polyak_sgd's value=loss) gets them as keyword arguments "
                    "of fgrad.step: fgrad.step(optimizer, params, opt_state, grads, "
                    "value=loss)."
                ) from err
        n_elems, n_def = jax.tree.flatten(new_inner, is_leaf=shaped)
        if n_def != sdef:
            raise ValueError(
                f"{caller}: the optimizer returned a state of another structure than it was "
                f"given ({n_def} vs {sdef}); fgrad.step needs update() to keep the state's "
                "structure, as optax's transformations do."
            )
        return updates, n_elems

    g_in_leaves = p_tree.flatten_up_to(g_in)
    # One optimizer run per group of parameters sharing their step counts (torch's
    # per-parameter state["step"]); a group whose members are only partly present splits
    # in two. What torch keeps per optimizer (schedules' counts, injected hyperparameters,
    # MultiSteps' counters) is global: every run advances it alike, and it advances even
    # in a step where no parameter has a gradient (a scheduler steps regardless).
    new_rests: list = []
    new_groups = [-1] * len(p_leaves)
    for k, rest in enumerate(rests):
        members = [i for i, gk in enumerate(groups) if gk == k]
        ran = [i for i in members if present[i]]
        kept = [i for i in members if not present[i]]
        if kept:
            for i in kept:
                new_groups[i] = len(new_rests)
            new_rests.append(rest)
        if not ran:
            continue
        # every present leaf takes part (a global-norm clip sees them all); this group's
        # members take their results
        updates, n_elems = run(rest, present)
        if new_globs is None:
            new_globs = [n_elems[j] for j in glob_at]
        new_slot_parts = {j: p_tree.flatten_up_to(n_elems[j]) for j in slot_at}
        u = p_tree.flatten_up_to(updates)
        for i in ran:
            for j in slot_at:
                new_slots[j][i] = new_slot_parts[j][i]
            new_p[i] = p_leaves[i] + u[i].astype(p_leaves[i].dtype)
            new_groups[i] = len(new_rests)
        new_rests.append(tuple(n_elems[j] for j in count_at))
    if new_globs is None:  # no gradient at all: only the global counts advance
        _, n_elems = run(rests[0], [False] * len(p_leaves))
        new_globs = [n_elems[j] for j in glob_at]
    out = list(elems)
    for j in slot_at:
        out[j] = p_tree.unflatten(new_slots[j])
    for r, j in enumerate(glob_at):
        out[j] = new_globs[r]
    empty = any(is_empty(g) for g in jax.tree.leaves(grads, is_leaf=is_hole))
    if not isinstance(opt_state, StepState) and (not empty or not (count_at or multisteps)):
        # optax's state in, and either nothing kept per parameter but the slots or only
        # frozen leaves (None) left out: one shared count serves every parameter that can
        # move, so optax's state comes back, with the structure it came in (a lax.scan
        # carry). (Under MultiSteps a StepState records which leaves had a gradient.)
        first = next((i for i, h in enumerate(present) if h), None)
        for r, j in enumerate(count_at):
            out[j] = elems[j] if first is None else new_rests[new_groups[first]][r]
        return p_tree.unflatten(new_p), _unshared(sdef.unflatten(out))
    state = StepState(
        sdef.unflatten(out),
        tuple(new_rests),
        tuple(new_groups),
        p_tree,
        tuple(present) if multisteps else None,
    )
    return p_tree.unflatten(new_p), _unshared(state)


def _is_step_count(inner: Any, path: tuple) -> bool:
    """Is the state leaf at ``path`` a bias-correction step count, which torch.optim keeps
    per parameter (``state[p]["step"]`` of Adam, AdamW, NAdam, RAdam, RMSprop, ...): the
    ``count`` of a NamedTuple that also holds a second moment ``nu`` (optax's
    ScaleByAdamState, ScaleByAmsgradState, ScaleByBeliefState, ...) or adafactor's
    factored one ``v_row`` (its decay rate follows the step, per parameter in
    ``torch.optim.Adafactor``)?"""
    if not path or not isinstance(path[-1], jax.tree_util.GetAttrKey):
        return False
    if path[-1].name != "count":
        return False
    node = inner
    for key in path[:-1]:
        if isinstance(key, jax.tree_util.GetAttrKey):
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
        else:
            return False
    fields = getattr(node, "_fields", ())
    return "count" in fields and ("nu" in fields or "v_row" in fields)


def _check_multisteps(
    inner: Any, before: tuple | None, nograd: list, params: Any, caller: str
) -> bool:
    """Refuse what `step` cannot do as torch does under ``optax.MultiSteps``: a parameter
    that had a gradient in an earlier micro-step of the window and has none now."""
    found = [
        x
        for x in jax.tree.leaves(inner, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
        if isinstance(x, optax.MultiStepsState)
    ]
    if not found:
        return False
    if before is None:  # optax's state comes back only while every trainable leaf moves
        before = tuple(True for _ in nograd)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    dropped = [paths[i] for i, (b, e) in enumerate(zip(before, nograd, strict=True)) if b and e]
    if not dropped:
        return True
    mini = found[0].mini_step
    message = (
        f"{caller}: under optax.MultiSteps, params{', params'.join(dropped)} had a "
        "gradient in the previous micro-step and none in this one while the accumulation "
        "window is not over. torch.optim would apply such a parameter's partial sum at "
        "the window's end; fgrad.step does not. Accumulate the window's gradients with "
        "fgrad.backward (loss / k, into one accumulator) and call fgrad.step with the "
        "plain optimizer once per window instead."
    )
    if isinstance(mini, jax.core.Tracer):  # under jit: checked when the step runs
        jax.debug.callback(functools.partial(_refuse_mid_window, message), mini)
    else:
        _refuse_mid_window(message, mini)
    return True


def _refuse_mid_window(message: str, mini_step: Any) -> None:
    if int(mini_step) != 0:  # 0: a new window starts, the sums were just applied
        raise ValueError(message)


def _unshared(tree: Any) -> Any:
    """``tree`` with no array object at two leaves (a copy at the second), so that the
    state can be donated (``jax.jit(..., donate_argnums=...)``)."""
    seen: set[int] = set()

    def one(x: Any) -> Any:
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(one, tree)
