"""The linear layer every projection is: built with its quantization method (`quant_method`), which holds the
weight in its format and multiplies by it; the layer keeps its shape, its bias and its fused parts' sizes
(`local_sizes`), so that a checkpoint tensor of one part lands in that part's rows whatever the format."""

import torch
from torch import nn

from pagedserve.model_executor.layers.quantization.base import LinearMethod, WeightItem, copy_rows, float_tensor
from pagedserve.model_executor.layers.quantization.config import QuantizationConfig

NO_QUANTIZATION = QuantizationConfig()


class LinearBase(nn.Module):
    """x [.., in_features] -> [.., out_features]; with one rank, a plain linear layer in its method's format."""

    silu_gate_up = False  # see quantization.base.QuantizableLayer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        local_sizes: list[int] | None = None,
        quant_method: LinearMethod | None = None,
    ) -> None:
        """`local_sizes`: the rows of each fused part (default one part); `quant_method`: given instead of asking
        `quant_config` for one (a head tied to the embedding takes the embedding's format)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.local_sizes = local_sizes or [out_features]
        self.quant_method = quant_method or self.choose_method(quant_config or NO_QUANTIZATION, prefix)
        self.quant_method.create_weights(self)
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def choose_method(self, quant_config: QuantizationConfig, prefix: str) -> LinearMethod:
        return quant_config.linear_method(self, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def checkpoint_slice(self, tensor: torch.Tensor, param: str, part: int | None) -> torch.Tensor:
        """This rank's piece of a checkpoint tensor (the whole of it here: see layers/parallel.py)."""
        return tensor

    def weight_names(self) -> tuple[str, ...]:
        """What the checkpoint fills."""
        return ("weight",) if self.bias is None else ("weight", "bias")

    def weight_loader(self, param: str, item: WeightItem, shard: int | None) -> None:
        """Load a checkpoint tensor of `param` (one of `weight_names`), or of its part `shard`."""
        if isinstance(item, torch.Tensor):
            item = self.checkpoint_slice(item, param, shard)
        if param == "weight":
            self.quant_method.load_weight(self, item, shard)
        elif param == "bias" and self.bias is not None:
            copy_rows(self.bias, float_tensor(item), self.local_sizes, shard)
        else:
            raise ValueError(f"{type(self).__name__} has no {param!r}")

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={type(self.quant_method).__name__}")


class Router(LinearBase):
    """An MoE router (or a shared expert's sigmoid gate): replicated on every rank, its outputs are logits."""

    def choose_method(self, quant_config: QuantizationConfig, prefix: str) -> LinearMethod:
        return quant_config.logits_method(self, prefix)
