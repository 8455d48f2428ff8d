"""Fused convolution and linear layers: one cnnfast.ops call each (conv2d; the head: gap_linear).

They subclass nn.Conv2d and nn.Linear, so they print, count (cnnfast.analysis) and move between
devices like PyTorch's own. They are for inference: built in eval mode, they refuse to run in
training mode, and built by from_modules their weights are constants (requires_grad=False); the
bias is the folded BatchNorm shift, kept in float32 whatever the weight's dtype.
"""
import operator

import torch
from torch import nn

from cnnfast import ops


# How nn.Module runs forward: a class that overrides one of these computes its own way.
CALL_METHODS = ("__call__", "_wrapped_call_impl", "_call_impl")


def overridden_method(module, cls) -> str | None:
    """The first method (by name) through which module, a cls, computes differently from cls: one
    that cls (or a base of it below nn.Module) defines and module's class overrides (an SE block's
    forward, a weight-standardised conv's _conv_forward), nn.Module's call machinery overridden,
    or any of these set on the instance itself (module.forward = ...); None where there is none."""
    methods = {name for klass in cls.__mro__[:cls.__mro__.index(nn.Module)] for name, value in vars(klass).items()
               if callable(value) and name not in ("__init__", "extra_repr")}

    def defined_in(klass, name):  # optimize()'s FusedForward runs the class's forward: not an override
        return next(base for base in klass.__mro__
                    if name in vars(base) and not getattr(base, "installed_by_optimize", False))

    return next((name for name in sorted(methods.union(CALL_METHODS))
                 if name in vars(module) or defined_in(type(module), name) is not defined_in(cls, name)), None)


def override_text(module, cls) -> str:
    """What overridden_method found, in words, for a report or an error."""
    method = overridden_method(module, cls)
    where = "on the instance" if method in vars(module) else f"in {type(module).__name__}"
    base = f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__
    return f"{type(module).__name__} overrides how {base} computes ({method}, {where})"


def computes_as(module, cls) -> bool:
    """Whether module is a cls that computes what cls computes (overridden_method finds nothing)."""
    return isinstance(module, cls) and overridden_method(module, cls) is None


def called_on_its_own(model_forward) -> bool:
    """Whether a part optimize() fused across a model's attributes runs outside the model's own
    forward (model_forward: the model's ModelForward; None for a module that is no such part)."""
    return model_forward is not None and not model_forward.running


def check_computes_as(module, cls, where: str, what: str) -> None:
    """Refuses a module that a fused form built from it would not compute as: TypeError for one
    that is not a cls (a Bottleneck given as a BasicBlock), NotImplementedError (optimize leaves
    it as it is) for a cls that computes otherwise (an SE block's own forward)."""
    if not isinstance(module, cls):
        raise TypeError(f"{where}: expected {what}, got {type(module).__name__}")
    if not computes_as(module, cls):
        raise NotImplementedError(f"{where}: {override_text(module, cls)}; it is not fused")


def is_foldable_norm(module) -> bool:
    """Whether module is a normalisation that folds into the conv before it: a BatchNorm2d, or
    torchvision's FrozenBatchNorm2d (detection backbones' BatchNorm, always in eval form)."""
    frozen = ops.loaded_frozen_batch_norm()
    return computes_as(module, nn.BatchNorm2d) or (frozen is not None and computes_as(module, frozen))


def check_foldable(bn, where: str) -> None:
    """Raises NotImplementedError for a module that is not a foldable normalisation (the part is
    then left as it is), RuntimeError for a BatchNorm that cannot be folded as it stands."""
    if not is_foldable_norm(bn):
        frozen = ops.loaded_frozen_batch_norm()
        base = next((cls for cls in (nn.BatchNorm2d, frozen) if cls is not None and isinstance(bn, cls)), None)
        if base is not None:
            raise NotImplementedError(f"{where}: {override_text(bn, base)}; it is not folded")
        raise NotImplementedError(f"{where}: {type(bn).__name__} is not a BatchNorm2d; only BatchNorm2d and "
                                  "FrozenBatchNorm2d are folded")
    problem = ops.batch_norm_statistics_problem(bn)
    if problem:
        raise RuntimeError(f"{where}: {problem}")


def check_relu(relu, where: str) -> None:
    """Raises NotImplementedError (the part is left as it is) for an activation module that is not
    a ReLU: a LeakyReLU, SiLU or ReLU6 put in a ResNet's place of one is not fused as a ReLU;
    TypeError for a relu that is neither a module, a bool nor None (a string 'no' is truthy)."""
    if relu is not None and not isinstance(relu, (bool, nn.Module)):
        raise TypeError(f"{where}: relu must be an activation module, a bool or None, got {relu!r}")
    if isinstance(relu, nn.Module) and not computes_as(relu, nn.ReLU):
        if isinstance(relu, nn.ReLU):
            raise NotImplementedError(f"{where}: {override_text(relu, nn.ReLU)}; it is not fused")
        raise NotImplementedError(f"{where}: the activation is {type(relu).__name__}, not ReLU; only ReLU is fused")


def module_dtype(dtype, weight: torch.Tensor, where: str) -> torch.dtype:
    """The dtype a fused module built from `weight` computes in: dtype, or the weight's where None.
    Refuses one the fused ops do not compute in (an int8 would truncate the weights, a float64
    module given no dtype= would make a module no op runs)."""
    if dtype is not None and dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if dtype is None and weight.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{where}: the weight is {weight.dtype}, which the fused ops do not compute in: pass "
                        "dtype=torch.float32, torch.float16 or torch.bfloat16")
    return dtype or weight.dtype


def conv_pair(value) -> tuple[int, int]:
    """An nn.Conv2d's stride, padding, dilation or kernel size as two Python ints: the module
    takes a 1-tuple and numpy ints (padding=k // 2 of a config array), which the ops refuse."""
    return tuple(operator.index(v) for v in (tuple(value) * 2 if len(value) == 1 else value))


HOOK_KINDS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
              "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


def check_no_hooks(where: str, *modules) -> None:
    """Raises NotImplementedError (the part is left as it is) where one of the part's modules, or
    a module inside one, has hooks: the fused module would drop them (a hook that reads a
    BatchNorm's output; the legacy spectral_norm's pre-hook, which recomputes the weight). An
    earlier optimize()'s input conversion (its object has installed_by_optimize) is not counted: a
    second optimize() keeps it."""
    for module in modules:
        for sub in module.modules() if isinstance(module, nn.Module) else ():
            kinds = [kind for attribute, kind in HOOK_KINDS.items()
                     if any(not getattr(hook, "installed_by_optimize", False) for hook in getattr(sub, attribute, {}).values())]
            if kinds:
                raise NotImplementedError(f"{where}: its {type(sub).__name__} has {' and '.join(kinds)}, which a "
                                          "fused module would not run")


def unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why ConvBNReLU cannot take this convolution, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d; it is not fused"
    if not computes_as(conv, nn.Conv2d):
        return f"{override_text(conv, nn.Conv2d)}; it is not fused"
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "only groups=1 convolutions with numeric zero padding are fused"
    return None


def check_inference(module: nn.Module) -> None:
    """Refuses a fused module in training mode: its BatchNorm is folded into constant weights, so
    training would neither update the statistics nor learn (training support is not built)."""
    if module.training:
        raise RuntimeError(f"{type(module).__name__}: in training mode, but fused modules are for inference "
                           "(their BatchNorm is folded into constant weights): call .eval()")


def compute_dtype(t, weight) -> torch.dtype:
    """The dtype a fused module computes t in: weight's where autocast made t another floating
    dtype (a layer left to PyTorch ran before this one under torch.autocast), since a fused module
    computes in the dtype optimize() gave it, whatever autocast asks; else t's own (outside
    autocast a mismatch stays the op's error)."""
    if t.is_floating_point() and t.dtype != weight.dtype and ops.autocast_enabled(t):
        return weight.dtype
    return t.dtype


def in_weight_dtype(t, weight):
    """t (or None) in compute_dtype(t, weight): the same tensor where that is its own dtype."""
    return None if t is None else t.to(compute_dtype(t, weight))


def backend_repr(backend) -> str:
    """", backend='triton'" for a module pinned to a backend; nothing for the default (None)."""
    return "" if backend is None else f", backend={backend!r}"


def _constant(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


class ConvBNReLU(nn.Conv2d):
    """relu?(conv(x) + bias + residual) with a BatchNorm folded into weight and bias."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, *,
                 relu=False, bn_folded=False, backend=None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=True,
                         device=device, dtype=dtype)
        self.training = False  # inference only (check_inference)
        self.relu = relu
        self.bn_folded = bn_folded
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn=None, relu=None, *, dtype=None, backend=None, name="conv"):
        """Fuses conv -> [bn] -> [relu]; BN is folded once, in float32. relu: a ReLU module, or a bool.
        NotImplementedError for a part it has no fused form of (a grouped conv, a GroupNorm, a SiLU)."""
        reason = unsupported_reason(conv)
        if reason is not None:
            raise NotImplementedError(f"{name}: {reason}")
        dtype = module_dtype(dtype, conv.weight, name)
        check_relu(relu, name)
        check_no_hooks(name, conv, bn, relu)
        if bn is not None:
            check_foldable(bn, name)
            weight, bias = ops.fold_bn(conv.weight, conv.bias, bn, dtype=dtype)
        else:
            weight = conv.weight.detach().to(dtype)
            bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels, device=weight.device)
        geometry = [conv_pair(value) for value in (conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
        fused = cls(conv.in_channels, conv.out_channels, *geometry, relu=bool(relu), bn_folded=bn is not None,
                    backend=backend, device="meta")
        fused.weight = _constant(weight.contiguous(memory_format=torch.channels_last))
        fused.bias = _constant(bias.float())
        return fused

    def forward(self, x, residual=None, out=None):
        check_inference(self)
        if x.dim() == 3:  # one unbatched (C, H, W) image, as nn.Conv2d takes it
            if any(t is not None and t.dim() != 3 for t in (residual, out)):
                raise ValueError("ConvBNReLU: with an unbatched (C, H, W) input, residual and out must be (K, P, Q)")
            y = self.forward(*(t.unsqueeze(0) if t is not None else None for t in (x, residual, out)))
            return out if out is not None else y.squeeze(0)
        x, residual = in_weight_dtype(x, self.weight), in_weight_dtype(residual, self.weight)
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                          residual=residual, relu=self.relu, out=out, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bn_folded={self.bn_folded}, relu={self.relu}{backend_repr(self.backend)}"


def _take_linear(fused: nn.Linear, linear: nn.Linear, dtype) -> nn.Linear:
    """Gives `fused` the weight of `linear` in `dtype` and its bias (or zeros) in float32."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features, device=weight.device)
    fused.weight = _constant(weight.to(dtype))
    fused.bias = _constant(bias.float())
    return fused


class LinearReLU(nn.Linear):
    """relu?(x @ weight.T + bias) as a 1x1 convolution over a 1x1 map: the bias and ReLU ride in
    the epilogue of the same GEMM."""

    def __init__(self, in_features, out_features, *, relu=False, backend=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)
        self.training = False  # inference only (check_inference)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(cls, linear: nn.Linear, relu=None, *, dtype=None, backend=None, name="linear"):
        """Fuses linear -> [relu]; relu: a ReLU module, or a bool. NotImplementedError for another
        activation or a part with hooks."""
        check_computes_as(linear, nn.Linear, name, "an nn.Linear")
        dtype = module_dtype(dtype, linear.weight, name)
        check_relu(relu, name)
        check_no_hooks(name, linear, relu)
        fused = cls(linear.in_features, linear.out_features, relu=bool(relu), backend=backend, device="meta")
        return _take_linear(fused, linear, dtype)

    def forward(self, x):
        check_inference(self)
        # Any leading dimensions, as nn.Linear takes them: a Linear fused inside an nn.Sequential may see (N, T, C).
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"LinearReLU expects (..., {self.in_features}) input, got shape {tuple(x.shape)}")
        rows = in_weight_dtype(x.reshape(-1, self.in_features), self.weight)
        y = ops.conv2d(rows[:, :, None, None], self.weight[:, :, None, None], self.bias, relu=self.relu,
                       backend=self.backend)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}{backend_repr(self.backend)}"


class GlobalAvgPoolLinear(nn.Linear):
    """Global average pooling + flatten + linear in one op (cnnfast.ops.gap_linear): (N, C, H, W) -> (N, out_features).

    model_forward: set by optimize() where this is a model's avgpool with the model's fc fused in
    (an object whose `running` says whether the model's own forward is running). Called otherwise
    (a parent's model.avgpool(x)), it is the pool it stands in for: (N, C, 1, 1)."""

    def __init__(self, in_features, out_features, *, backend=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)
        self.training = False  # inference only (check_inference)
        self.backend = backend
        self.model_forward = None

    @classmethod
    def from_modules(cls, linear: nn.Linear, *, dtype=None, backend=None, name="fc"):
        check_computes_as(linear, nn.Linear, name, "an nn.Linear")
        dtype = module_dtype(dtype, linear.weight, name)
        check_no_hooks(name, linear)
        fused = cls(linear.in_features, linear.out_features, backend=backend, device="meta")
        return _take_linear(fused, linear, dtype)

    def forward(self, x):
        check_inference(self)
        x = in_weight_dtype(x, self.weight)
        if called_on_its_own(self.model_forward):
            if x.dim() == 3:  # one unbatched (C, H, W) map, as nn.AdaptiveAvgPool2d takes it
                return ops.global_avg_pool(x[None], backend=self.backend)[0, :, None, None]
            return ops.global_avg_pool(x, backend=self.backend)[:, :, None, None]
        return ops.gap_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{backend_repr(self.backend)}"
