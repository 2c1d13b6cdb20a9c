"""Turn the flat graph of an uploaded torch.export program (`ExportedProgram.module()`) into a
model the techniques can work with, the way they work with an eager nn.Module:

- batch generalisation: an export made with a fixed example batch bakes that batch into shape
  arguments (`aten.view(x, [1, 2048])`) and a guard; those become the input's real batch size,
  checked against the original graph, so calibration, training and evaluation can use any batch;
- module-isation: `aten.conv2d` / `aten.linear` / `aten.batch_norm` / `aten.layer_norm`
  call_function nodes become call_module nodes of real nn.Conv2d / nn.Linear / nn.BatchNorm /
  nn.LayerNorm modules holding the same
  Parameters, so the graph trains (train()/eval() switch batch norm), Torch-Pruning's dependency
  graph can remove channels, and torch.export re-exports it.

`torch.export.unflatten` was not enough: it restores the module hierarchy but each submodule is
still an aten graph over plain attributes, not an nn.Conv2d that Torch-Pruning recognises.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

ATEN = torch.ops.aten
GUARD_MODULE = "_guards_fn"  # ExportedProgram.module() checks the exported input shapes with it
# shape arguments whose leading element is the batch when the input's leading dimension is
BATCH_SHAPED_OPS = {ATEN.view.default, ATEN.reshape.default, ATEN._unsafe_view.default, ATEN.expand.default}
VERIFY_BATCHES = (2, 5)
BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def prepare_exported_module(module: fx.GraphModule, batch: int | None,
                            input_shape: tuple) -> tuple[fx.GraphModule, int | None, dict]:
    """Module-ise `module` in place and, when it was exported for a fixed `batch`, generalise it
    to any batch. Returns the module, the batch it is still fixed to (None when it takes any),
    and a description of what was done for LoadedModel.preparation."""
    layers = modularise(module)
    module.eval()  # new batch-norm modules start in training mode; the graph was exported for inference
    notes = {"modules": layers or "none: no convolution, linear or batch-norm op with its own weights"}
    if batch is None:
        notes["batch"] = "dynamic in the export"
        return module, None, notes
    error = generalise_batch(module, batch, input_shape)
    if error is None:
        notes["batch"] = (f"exported for a fixed batch of {batch}; rewritten to take any batch "
                          f"(verified on batches {VERIFY_BATCHES})")
        return module, None, notes
    notes["batch"] = (f"fixed at {batch}: the graph could not be generalised ({error}); "
                      f"every step feeds batches of {batch}")
    return module, batch, notes


# --------------------------------------------------------------------------- batch generalisation

def generalise_batch(module: fx.GraphModule, batch: int, input_shape: tuple) -> str | None:
    """Rewrite the shape arguments that carry the fixed `batch` to the input's run-time batch
    size, drop the export's shape guard, and check that batches of VERIFY_BATCHES give, row by
    row, what the original graph gives. On success returns None; otherwise restores the graph
    (and its guard) and returns why it failed."""
    graph = module.graph
    samples = _verification_samples(batch, input_shape)
    try:
        with torch.no_grad():
            reference = torch.cat([module(chunk) for chunk in samples.split(batch)])
    except Exception as error:  # e.g. several outputs: leave the graph as exported
        return f"its own batch of {batch} gave no single tensor to compare: {_first_line(error)}"
    rewritten = _rewrite_batch_arguments(graph, batch)
    guards = [node for node in graph.nodes if node.op == "call_module" and node.target == GUARD_MODULE]
    guard_inputs = [node.args for node in guards]
    for node in guards:
        graph.erase_node(node)
    module.recompile()
    error = _compare(module, samples, reference)
    if error is None:
        if hasattr(module, GUARD_MODULE):
            module.delete_submodule(GUARD_MODULE)
        # without the guard module, a forward pre-hook would check the exported (fixed) shapes
        module.validate_inputs = False
        return None
    for sym_size, node, old_args in rewritten:
        node.args = old_args
        graph.erase_node(sym_size)
    placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    for args in guard_inputs:
        with graph.inserting_after(placeholder):
            graph.call_module(GUARD_MODULE, args)
    module.recompile()
    return error


def _verification_samples(batch: int, input_shape: tuple) -> torch.Tensor:
    count = max(VERIFY_BATCHES) * batch  # a multiple of the fixed batch, for the reference run
    return torch.randn(count, *input_shape, generator=torch.Generator().manual_seed(0))


def _rewrite_batch_arguments(graph: fx.Graph, batch: int) -> list[tuple[fx.Node, fx.Node, tuple]]:
    """Replace the leading `batch` of view/reshape/expand shape lists with sym_size(input, 0).
    Returns (sym_size node, rewritten node, its old args) for undoing."""
    rewritten = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in BATCH_SHAPED_OPS or len(node.args) < 2:
            continue
        source, shape = node.args[0], node.args[1]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if (not isinstance(shape, (list, tuple)) or not shape or shape[0] != batch
                or value is None or value.ndim == 0 or value.shape[0] != batch):
            continue
        with graph.inserting_before(node):
            sym_size = graph.call_function(ATEN.sym_size.int, (source, 0))
        old_args = node.args
        node.args = (source, [sym_size, *shape[1:]], *node.args[2:])
        rewritten.append((sym_size, node, old_args))
    return rewritten


def _compare(module: fx.GraphModule, samples: torch.Tensor, reference: torch.Tensor) -> str | None:
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    try:
        with torch.no_grad():
            for size in VERIFY_BATCHES:
                output = module(samples[:size])
                if output.shape != reference[:size].shape:
                    return f"batch {size} gave shape {tuple(output.shape)}"
                if not torch.allclose(output, reference[:size], rtol=1e-4, atol=tolerance):
                    return f"batch {size} changed the outputs of individual samples"
    except Exception as error:  # a shape the rewrite did not reach: the graph stays fixed-batch
        return f"batch {size} failed: {_first_line(error)}"
    return None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --------------------------------------------------------------------------- module-isation

def modularise(module: fx.GraphModule) -> dict[str, int]:
    """Replace convolution, linear, batch-norm and layer-norm ops whose weights are attributes used by that
    op alone with call_module nodes of the matching nn layer; returns how many of each. Shared
    (tied) weights and other layouts stay functional. Also lets train()/eval() work again."""
    graph = module.graph
    _drop_attribute_casts(module)
    counts: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        converted = (_convolution(module, node) or _linear(module, node) or _addmm(module, node)
                     or _batch_norm(module, node) or _layer_norm(module, node))
        if converted:
            counts[converted] = counts.get(converted, 0) + 1
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    # ExportedProgram.module() makes train()/eval() raise because batch-norm ops are frozen in the
    # graph; with batch norms as modules the ordinary nn.Module methods switch them
    for method in ("train", "eval"):
        module.__dict__.pop(method, None)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return counts


def _drop_attribute_casts(module: fx.GraphModule) -> None:
    """Remove casts of a weight to the dtype it has, and checks of its metadata that hold: a
    TorchScript file's graph reads timm's scripted `Linear` as `F.linear(x, weight.to(x.dtype))`
    behind `_assert_tensor_metadata(weight)`, so the linear op did not own its weight, stayed
    functional, and Torch-Pruning cut the channels before it but not its weight (MobileNetV3's
    channel pruning failed with 'index 1024 is out of bounds for dimension 0 with size 1024')."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (ATEN.to.dtype, ATEN._assert_tensor_metadata.default):
            continue
        value = _attribute(module, node.args[0])
        if value is None:
            continue
        args = _arguments(node)
        if node.target == ATEN.to.dtype:
            if args["dtype"] == value.dtype and args["memory_format"] in (None, torch.preserve_format):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        elif all(args[key] in (None, expected) for key, expected in (
                ("size", list(value.shape)), ("stride", list(value.stride())), ("dtype", value.dtype),
                ("device", value.device), ("layout", value.layout))):
            graph.erase_node(node)


def _arguments(node: fx.Node) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    values = {arg.name: arg.default_value for arg in schema.arguments}
    values.update(zip([arg.name for arg in schema.arguments], node.args))
    values.update(node.kwargs)
    return values


def _own_attribute(module: fx.GraphModule, node, consumer: fx.Node):
    """The tensor a get_attr `node` reads when `consumer` is its only user (else None)."""
    if not isinstance(node, fx.Node) or list(node.users) != [consumer]:
        return None
    return _attribute(module, node)


def _attribute(module: fx.GraphModule, node):
    """The tensor a get_attr `node` reads (else None)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner_path, _, name = node.target.rpartition(".")
    value = getattr(module.get_submodule(owner_path), name, None)
    return value if isinstance(value, torch.Tensor) else None


def _pair(value) -> tuple:
    """A 2-D layer's stride/padding/dilation from an aten argument ([s, s], [s] or s)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return values * 2 if len(values) == 1 else values


def _convolution(module, node) -> str | None:
    if node.target not in (ATEN.conv2d.default, ATEN.convolution.default):
        return None
    args = _arguments(node)
    if args.get("transposed") or any(args.get("output_padding") or []):
        return None
    weight = _own_attribute(module, args["weight"], node)
    bias = _own_attribute(module, args["bias"], node) if args["bias"] is not None else None
    if weight is None or weight.ndim != 4 or (args["bias"] is not None and bias is None):
        return None
    groups = int(args["groups"])
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), _pair(args["stride"]),
                      _pair(args["padding"]), _pair(args["dilation"]), groups, bias=bias is not None, device="meta")
    _install(module, node, args["input"], layer, {"weight": args["weight"], "bias": args["bias"]})
    return "Conv2d"


def _linear(module, node) -> str | None:
    if node.target != ATEN.linear.default:
        return None
    args = _arguments(node)
    weight = _own_attribute(module, args["weight"], node)
    bias = _own_attribute(module, args["bias"], node) if args["bias"] is not None else None
    if weight is None or weight.ndim != 2 or (args["bias"] is not None and bias is None):
        return None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    _install(module, node, args["input"], layer, {"weight": args["weight"], "bias": args["bias"]})
    return "Linear"


def _addmm(module, node) -> str | None:
    """addmm(bias, x, t(weight)): how a decomposed program spells a linear layer."""
    if node.target != ATEN.addmm.default:
        return None
    args = _arguments(node)
    transposed = args["mat2"]
    if (args["beta"] != 1 or args["alpha"] != 1 or not isinstance(transposed, fx.Node)
            or list(transposed.users) != [node] or not (
                transposed.target == ATEN.t.default
                or (transposed.target == ATEN.permute.default and list(transposed.args[1]) == [1, 0]))):
        return None
    weight = _own_attribute(module, transposed.args[0], transposed)
    bias = _own_attribute(module, args["self"], node)
    if weight is None or weight.ndim != 2 or bias is None or bias.shape != (weight.shape[0],):
        return None
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    _install(module, node, args["mat1"], layer, {"weight": transposed.args[0], "bias": args["self"]})
    module.graph.erase_node(transposed)
    return "Linear"


def _batch_norm(module, node) -> str | None:
    """aten.batch_norm, or _native_batch_norm_legit_no_training, which returns (output, mean,
    invstd) read through getitem nodes: only the output may be used."""
    tuple_output = node.target == ATEN._native_batch_norm_legit_no_training.default
    if node.target != ATEN.batch_norm.default and not tuple_output:
        return None
    if tuple_output and any(user.target is not operator.getitem or (user.args[1] != 0 and user.users)
                            for user in node.users):
        return None
    args = _arguments(node)
    weight = _own_attribute(module, args["weight"], node) if args["weight"] is not None else None
    bias = _own_attribute(module, args["bias"], node) if args["bias"] is not None else None
    mean = _own_attribute(module, args["running_mean"], node)
    var = _own_attribute(module, args["running_var"], node)
    value = args["input"].meta.get("val") if isinstance(args["input"], fx.Node) else None
    affine = args["weight"] is not None and args["bias"] is not None
    if (mean is None or var is None or value is None or value.ndim not in BATCH_NORMS
            or (affine and (weight is None or bias is None)) or (args["weight"] is None) != (args["bias"] is None)):
        return None
    layer = BATCH_NORMS[value.ndim](mean.shape[0], eps=float(args["eps"]), momentum=float(args["momentum"]),
                                    affine=affine, device="meta")
    attributes = {"weight": args["weight"], "bias": args["bias"], "running_mean": args["running_mean"],
                  "running_var": args["running_var"]}
    if tuple_output:
        outputs = [user for user in node.users if user.args[1] == 0]
        unused = [user for user in node.users if user.args[1] != 0]
        layer_node = _install(module, node, args["input"], layer, attributes, replace_uses=False)
        for user in outputs:
            user.replace_all_uses_with(layer_node)
        for user in outputs + unused:
            module.graph.erase_node(user)
        module.graph.erase_node(node)
    else:
        _install(module, node, args["input"], layer, attributes)
    return type(layer).__name__


def _layer_norm(module, node) -> str | None:
    """aten.layer_norm over the last dimension (ConvNeXt's norms, channels last): as an
    nn.LayerNorm, Torch-Pruning narrows its normalized_shape with its weight; the functional op
    kept its shape argument and failed once the weight was pruned."""
    if node.target != ATEN.layer_norm.default:
        return None
    args = _arguments(node)
    shape = list(args["normalized_shape"])
    weight = _own_attribute(module, args["weight"], node) if args["weight"] is not None else None
    bias = _own_attribute(module, args["bias"], node) if args["bias"] is not None else None
    if (len(shape) != 1 or weight is None or weight.shape != (shape[0],)
            or (args["bias"] is not None and (bias is None or bias.shape != weight.shape))):
        return None
    layer = nn.LayerNorm(shape[0], eps=float(args["eps"]), bias=bias is not None, device="meta")
    _install(module, node, args["input"], layer, {"weight": args["weight"], "bias": args["bias"]})
    return "LayerNorm"


def _install(module: fx.GraphModule, node: fx.Node, input_node, layer: nn.Module, attributes: dict,
             replace_uses: bool = True) -> fx.Node:
    """Move the tensors the get_attr nodes in `attributes` read into `layer`, register it (in
    place of their owner module when that is a bare container of just these tensors, so
    state_dict keys stay the same), and call it where `node` was."""
    sources = {name: source for name, source in attributes.items() if source is not None}
    owners = {source.target.rpartition(".")[0] for source in sources.values()}
    names = {source.target.rpartition(".")[2] for source in sources.values()}
    for name, source in sources.items():
        owner_path, _, attribute = source.target.rpartition(".")
        owner = module.get_submodule(owner_path)
        tensor = getattr(owner, attribute)
        if name in ("weight", "bias"):
            # TorchScript conversion lifts weights as buffers: as parameters they train and prune
            setattr(layer, name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach()))
        else:
            layer.register_buffer(name, tensor)
        delattr(owner, attribute)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        tracked = module.get_submodule(next(iter(owners)))._buffers.pop("num_batches_tracked", None) \
            if len(owners) == 1 else None
        layer.register_buffer("num_batches_tracked", tracked if tracked is not None else torch.tensor(0))
    target = _layer_path(module, owners, names, node.name)
    if target in dict(module.named_modules()):
        module.set_submodule(target, layer)
    else:
        module.add_submodule(target, layer)
    graph = module.graph
    with graph.inserting_before(node):
        layer_node = graph.call_module(target, (input_node,))
    layer_node.meta = dict(node.meta)
    if replace_uses:
        node.replace_all_uses_with(layer_node)
        graph.erase_node(node)
    for source in sources.values():
        if not source.users:
            graph.erase_node(source)
    return layer_node


def _layer_path(module: fx.GraphModule, owners: set, names: set, fallback: str) -> str:
    """The owner's path when it is a bare nn.Module left empty (an exported model's container for
    e.g. `stem.0`), else a fresh top-level name."""
    if len(owners) == 1:
        path = next(iter(owners))
        owner = module.get_submodule(path)
        if (path and type(owner) is nn.Module and not owner._modules and not owner._parameters
                and not owner._buffers):
            return path
    name, index = fallback, 1
    while hasattr(module, name):
        name, index = f"{fallback}_{index}", index + 1
    return name
