"""The dense model's activations, batch by batch, beside the sequential pipeline's pruned ones.

llm-compressor's sequential pipeline feeds decoder layer l the outputs of the already pruned
layers 0..l-1. For ``dense_target`` above 0 the re-fit of a layer also needs what its
inputs would be in the dense model, so that it can aim at the dense model's outputs and so
correct the error the earlier layers left. ``DenseStream`` keeps that second stream: when a
decoder layer is about to run on batch b, ``run`` first runs the same layer, weights still
dense, on the dense input of batch b, returns the inputs its Linear layers saw in that run
(captured by the stream's own temporary hooks) and keeps the dense output as the next layer's
dense input. The first layer's dense and pruned inputs are equal, so there the pipeline's own
calibration forward is the dense run: ``run`` returns ``SAME_INPUTS`` for its Linear layers
and ``keep_output`` takes the output of that forward. ``output`` lends block tuning
(block_tuning.py) a layer's dense outputs once the layer has seen every batch.
"""

from __future__ import annotations

import torch

__all__ = ["SAME_INPUTS", "DenseStream", "check_chain", "hidden_states"]


class _SameInputs:
    """Marker: a Linear's dense-model inputs are the very inputs it is calibrated on."""

    def __repr__(self) -> str:
        return "SAME_INPUTS"


SAME_INPUTS = _SameInputs()


def hidden_states(output):
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def check_chain(layers: list[str]) -> None:
    """The stream feeds each sequential target's output to the next one, which is right for the
    decoder layers (``prefix.0`` .. ``prefix.N-1``), not for e.g. attention / MLP targets."""
    parts = [name.rpartition(".") for name in layers]
    prefixes = {prefix for prefix, _, _ in parts}
    if not layers or len(prefixes) != 1 or [index for _, _, index in parts] != [str(i) for i in range(len(layers))]:
        shown = ", ".join(layers[:3]) + (" ..." if len(layers) > 3 else "")
        raise ValueError(
            f"UniPruningModifier: dense_target needs the decoder layers as sequential targets (one list, "
            f"each layer's output the next one's input); got {shown or 'none'}"
        )


class DenseStream:
    """Dense hidden states per (decoder layer, batch), offloaded between layers."""

    def __init__(
        self, layers: int, offload_device: torch.device | str = "cpu", every: int = 1, first_batch: int = 0, keep_last: bool = False
    ):
        self._count = layers + 1 if keep_last else layers  # the last layer's outputs feed no layer but block tuning
        self._offload = torch.device(offload_device)
        self._every = every
        self._first = first_batch  # global index of this rank's first batch (data-parallel ranks)
        self._inputs: dict[int, dict[int, torch.Tensor]] = {}
        self._batches: dict[int, int] = {}
        self._first_layer_batch: int | None = None  # the batch whose first-layer output is awaited

    def run(
        self, layer: int, module: torch.nn.Module, args: tuple, kwargs: dict, linears: dict[torch.nn.Module, str]
    ) -> dict[str, torch.Tensor | _SameInputs]:
        """Run ``module`` (decoder layer ``layer``, not yet pruned) on the dense input of the batch
        whose pruned input is in ``args``/``kwargs``; the inputs of ``linears`` (module -> name)
        during that run, by name. Only every ``every``-th batch (by global index) runs (the others
        return {}). The first layer does not run here: its Linear layers get ``SAME_INPUTS`` and
        the caller passes the output of its calibration forward to ``keep_output``. The caller
        keeps other hooks from seeing the run."""
        batch = self._batches.get(layer, 0)
        self._batches[layer] = batch + 1
        if not self.takes(batch):
            return {}
        if layer == 0:
            self._first_layer_batch = batch
            return {name: SAME_INPUTS for name in linears.values()}
        positional = len(args) > 0
        pruned = args[0] if positional else kwargs["hidden_states"]
        waiting = self._inputs.get(layer, {})
        stored = waiting.pop(batch, None)
        if stored is None:
            raise RuntimeError(
                f"dense_target: no dense input for decoder layer {layer}, batch {batch}; the decoder layers "
                "must each see every batch, in order (llm-compressor's sequential pipeline)"
            )
        if not waiting:
            self._inputs.pop(layer, None)
        dense = stored.to(pruned.device)
        if positional:
            args = (dense, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": dense}
        captured: dict[str, torch.Tensor] = {}
        handles = [
            linear.register_forward_hook(lambda _m, inputs, _out, name=name: captured.__setitem__(name, inputs[0]))
            for linear, name in linears.items()
        ]
        try:
            output = module.forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self._keep(layer + 1, batch, output)
        return captured

    def keep_output(self, output) -> None:
        """The first decoder layer's output on the batch ``run`` last passed (its calibration
        forward, weights still dense, on inputs both streams share): the second layer's dense
        input. Batches ``run`` skipped are ignored."""
        batch, self._first_layer_batch = self._first_layer_batch, None
        if batch is not None:
            self._keep(1, batch, output)

    def takes(self, batch: int) -> bool:
        """Whether the stream runs on this rank's ``batch`` (local index): every ``every``-th
        batch by global index."""
        return (self._first + batch) % self._every == 0

    def output(self, layer: int, batch: int) -> torch.Tensor | None:
        """Decoder layer ``layer``'s dense output on ``batch`` (None where the stream skipped it),
        until the next layer consumes it; the last layer's only with ``keep_last``."""
        return self._inputs.get(layer + 1, {}).get(batch)

    def _keep(self, layer: int, batch: int, output) -> None:
        if layer < self._count:
            self._inputs.setdefault(layer, {})[batch] = hidden_states(output).detach().to(self._offload)
