"""The stand-ins optimize() leaves where a model's stem or head was fused across its attributes
(a ResNet's conv1 takes bn1 and relu, its avgpool takes fc), and the bookkeeping that keeps each
part right both in the model's own forward and when other code calls it by name."""
import torch
import torch.nn.functional as F
from torch import nn

from cnnfast.nn.conv import GlobalAvgPoolLinear, in_weight_dtype


class ModelForward:
    """The bookkeeping of a model whose stem or head optimize() fused across its attributes (conv1
    takes bn1 and relu; avgpool takes fc), which is right inside the model's own forward only.
    enter (its forward pre-hook) and leave (its forward hook, run when the forward raises too)
    count the model's forwards in progress, `running`, which the fused head and the Absorbed parts
    read: a parent's model.avgpool(x) gets the pool alone, model.fc(features) the linear layer.
    enter refuses a model whose fused parts were replaced since: model.fc = nn.Identity() would
    return the fused head's logits as features. A torch.fx graph of the model has no hooks and
    calls each part itself: the pool, then the linear layer, which give the same logits."""

    installed_by_optimize = True

    def __init__(self):
        self.parts, self.running = {}, 0

    def enter(self, model, args):
        self.running += 1  # first: leave() runs when this raises too
        replaced = [name for name, part in self.parts.items() if model._modules.get(name) is not part]
        if replaced:
            raise RuntimeError(
                f"{type(model).__name__}: {', '.join(replaced)} {'was' if len(replaced) == 1 else 'were'} replaced "
                "after cnnfast.optimize() fused the model's "
                "stem (conv1 takes bn1 and relu) or head (avgpool takes fc) across these attributes, which its "
                "forward would now run with the new parts; change the model before optimize()")

    def leave(self, model, args, output):
        self.running -= 1


class Absorbed(nn.Module):
    """A part of a model that optimize() fused into another (`into`): the identity inside the
    model's own forward, where `into` computes it; called on its own (by a parent's code), what
    the part computed: the ReLU, or the fc layer from the weights the fused head (`head`) holds."""

    def __init__(self, into: str, model_forward: ModelForward, head: GlobalAvgPoolLinear | None = None):
        super().__init__()
        self.into, self.model_forward = into, model_forward
        self.__dict__["head"] = head  # not a submodule: the model's avgpool, which holds the weights

    def forward(self, x):
        if self.model_forward.running:
            return x
        if self.head is None:
            return torch.relu(x)
        x = in_weight_dtype(x, self.head.weight)
        return F.linear(x, self.head.weight, self.head.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"into={self.into!r}"
