"""The stand-ins optimize() leaves where a model's stem or head was fused across its attributes
(a ResNet's conv1 takes bn1 and relu, its avgpool takes fc), and the bookkeeping that keeps each
part right both in the model's own forward and when other code calls it by name."""
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from cnnfast.nn.conv import GlobalAvgPoolLinear, called_on_its_own, in_weight_dtype


class ModelForward:
    """The bookkeeping of a model whose stem or head optimize() fused across its attributes (conv1
    takes bn1 and relu, bn_final the relu, avgpool fc): which parts were rewired (`parts`: name ->
    type), and how many of the model's forwards are in progress on each thread (`depth`; one count
    for a graph torch.compile traces). The fused parts and the Absorbed stand-ins compute their
    fused form only while `running`; other code calling a part by name gets what it computed
    before: model.avgpool(x) the pool alone, model.fc(features) the linear layer. A part called by
    name from a forward hook of one of the model's layers, while the model's forward runs on the
    same thread, gets the fused form. A torch.fx graph of the model calls each part itself, as
    other code does: the pool, then the linear layer, the same logits."""

    def __init__(self):
        self.parts, self.depth = {}, {}

    @staticmethod
    def key():
        # Inside a traced graph, one count: dynamo cannot trace the thread's id.
        return "compiled" if torch.compiler.is_compiling() else threading.get_ident()

    @property
    def running(self) -> bool:
        return self.depth.get(self.key(), 0) > 0

    def check_parts(self, model: nn.Module) -> None:
        """Refuses a model whose rewired parts were replaced since optimize(): model.fc =
        nn.Identity() would return the fused head's logits as features."""
        replaced = [name for name, kind in self.parts.items() if type(model._modules.get(name)) is not kind]
        if replaced:
            raise RuntimeError(
                f"{type(model).__name__}: {', '.join(replaced)} {'was' if len(replaced) == 1 else 'were'} replaced "
                "after cnnfast.optimize() fused the model's stem (conv1 takes bn1 and relu) or head (avgpool takes "
                "fc) across these attributes, which its forward would now run with the new parts; change the model "
                "before optimize()")


class FusedForward:
    """Put before a model's class by optimize() (fused_class), whose forward it runs, counted in
    the model's ModelForward (`cnnfast_forward`) while it runs, however it ends (an exception, a
    KeyboardInterrupt). A class, not an attribute of the model, so that nn.DataParallel's replicas
    and shallow copies run their own modules."""

    installed_by_optimize = True  # not an override of how the model computes (computes_as)

    def __reduce_ex__(self, protocol):
        # pickle cannot find a class made at run time by name: rebuilt from the model's own class.
        return _fused_instance, (type(self).model_class,), self.__dict__


FUSED_CLASSES = {}


def fused_class(model_class: type) -> type:
    """model_class with FusedForward before it (one class per model class). Its forward wraps the
    class's (functools.wraps: torch.fx and torch.export read the arguments of the wrapped one)."""
    if model_class in FUSED_CLASSES:
        return FUSED_CLASSES[model_class]
    model_forward = model_class.forward

    @functools.wraps(model_forward)
    def forward(self, *args, **kwargs):
        state = self.cnnfast_forward
        state.check_parts(self)
        key = state.key()
        state.depth[key] = state.depth.get(key, 0) + 1
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            state.depth[key] -= 1
            if not state.depth[key]:
                del state.depth[key]

    FUSED_CLASSES[model_class] = type(model_class.__name__, (FusedForward, model_class),
                                      {"model_class": model_class, "forward": forward})
    return FUSED_CLASSES[model_class]


def _fused_instance(model_class: type):
    cls = fused_class(model_class)
    return cls.__new__(cls)


def installed_forward(model: nn.Module) -> ModelForward:
    """The model's ModelForward; on first use, its class becomes fused_class(its class)."""
    if not isinstance(model, FusedForward):
        model.__class__ = fused_class(type(model))
        model.cnnfast_forward = ModelForward()
    return model.cnnfast_forward


class Absorbed(nn.Module):
    """A part of a model that optimize() fused into another (`into`): the identity inside the
    model's own forward, where `into` computes it; called on its own (by other code), what the
    part computed: the ReLU, or the fc layer from the weights the fused head (`head`) holds, which
    it shows as its own weight and bias (a class activation map reads model.fc.weight)."""

    def __init__(self, into: str, model_forward: ModelForward, head: GlobalAvgPoolLinear | None = None):
        super().__init__()
        self.into, self.model_forward = into, model_forward
        self.__dict__["head"] = head  # not a submodule: the model's avgpool, which holds the weights

    def _linear(self, name):
        if self.head is None:
            raise AttributeError(f"Absorbed ReLU (into {self.into}) has no {name}")
        return getattr(self.head, name)

    weight = property(lambda self: self._linear("weight"))
    bias = property(lambda self: self._linear("bias"))
    in_features = property(lambda self: self._linear("in_features"))
    out_features = property(lambda self: self._linear("out_features"))

    def forward(self, x):
        if not called_on_its_own(self.model_forward):
            return x
        if self.head is None:
            return torch.relu(x)
        x = in_weight_dtype(x, self.head.weight)
        return F.linear(x, self.head.weight, self.head.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"into={self.into!r}"
