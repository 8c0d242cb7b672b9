"""An eval-mode network rewritten into an equivalent one that is cheaper to run (used by the engine).

* ``Conv2d`` immediately followed by ``BatchNorm2d`` inside a plain ``nn.Sequential`` (the
  ``ConvBNAct`` blocks): the BN folded into the convolution's weights and bias;
* ``PReLU`` with every slope in [0, 1]: computed as ``max(x, a*x)`` outside float32.

docs/benchmarks.md says what each buys on a CPU. Torch is imported only when a model is rewritten.
"""
from __future__ import annotations

_PRELU_AS_MAX = None


def _prelu_as_max_class():
    """``nn.Module`` computing PReLU as ``max(x, a*x)``: the same values when every slope ``a`` is in [0, 1].

    PyTorch's own bf16 PReLU kernel on the CPU is several times slower than a multiply and a
    maximum (it dominated the non-convolution time of the VGG-encoder models); in float32 the
    native kernel is kept.
    """
    global _PRELU_AS_MAX
    if _PRELU_AS_MAX is None:
        import torch
        import torch.nn.functional as F
        from torch import nn

        class PReLUAsMax(nn.Module):
            def __init__(self, prelu):
                super().__init__()
                self.weight = nn.Parameter(prelu.weight.detach().clone(), requires_grad=False)

            def forward(self, x):
                if x.dtype == torch.float32 or x.dim() < 2:
                    return F.prelu(x, self.weight)
                a = self.weight.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
                y = x * a
                return torch.maximum(x, y, out=y) if not y.requires_grad else torch.maximum(x, y)

        _PRELU_AS_MAX = PReLUAsMax
    return _PRELU_AS_MAX


def inference_graph(model):
    """Rewrite an eval-mode model in place into an equivalent one that is cheaper to run.

    * ``Conv2d`` immediately followed by ``BatchNorm2d`` inside a plain ``nn.Sequential`` (the
      ``ConvBNAct`` blocks): the BN's running statistics and affine parameters are folded into
      the convolution's weights and bias, and the BN becomes ``Identity`` (exact up to float
      rounding: the output changes by ~1e-5 relative);
    * ``PReLU`` whose slopes all lie in [0, 1]: computed as ``max(x, a*x)`` outside float32.

    A model in training mode is returned unchanged. Returns ``model``.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        return model
    for parent in list(model.modules()):
        names = list(parent._modules)
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            for a, b in zip(names, names[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                        and bn.running_mean is not None and conv.out_channels == bn.num_features):
                    parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                    parent._modules[b] = nn.Identity()
        for name in names:
            child = parent._modules[name]
            if type(child) is nn.PReLU:
                w = child.weight.detach()
                if bool(((w >= 0) & (w <= 1)).all()):
                    parent._modules[name] = _prelu_as_max_class()(child)
    return model

