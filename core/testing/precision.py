"""The precision conformance suite: ``class TestMine(PrecisionConformance): precision = Mine``.

It checks that the component is a ``treadle.Precision`` that sets up on the device, carries a
model through one forward, backward and step, keeps its state as JSON that loads back, trains
the tiny model, and resumes from a checkpoint bit for bit.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from treadle.components import Precision
from treadle.testing._fit import check_resume_exact, fresh, make_run, required, scratch, weights
from treadle.testing.models import TinyModel, tiny_data

__all__ = ["PrecisionConformance"]


def _build(spec: Any) -> Precision:
    from treadle.registry import component as build

    component = build("precision", fresh(spec), Precision)
    assert isinstance(component, Precision)
    return component


class PrecisionConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        precision: the precision: a class or zero-argument factory, an entry-point name, or a
            ``{"name": ..., **options}`` mapping.
        device: the device the checks run on (``"cpu"``).
    """

    precision: ClassVar[Any] = None
    device: ClassVar[str] = "cpu"

    def _new(self) -> Precision:
        precision = _build(required(self, "precision"))
        precision.setup(torch.device(self.device))
        return precision

    def test_is_a_precision_with_a_name(self) -> None:
        precision = self._new()
        assert isinstance(precision, Precision), f"{precision!r} is not a treadle.Precision"
        assert isinstance(precision.name, str) and precision.name, "set the class attribute name"

    def test_one_step_by_hand(self) -> None:
        precision = self._new()
        torch.manual_seed(0)
        model = precision.convert_module(TinyModel().to(self.device))
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        rows = [tiny_data(8)[i] for i in range(8)]
        batch = {k: torch.stack([row[k] for row in rows]).to(self.device) for k in rows[0]}
        batch = precision.convert_input(batch)
        with precision.forward_context():
            loss = model(**batch)["loss"]
        assert torch.isfinite(loss).all(), f"the forward pass gave a non-finite loss {loss}"
        torch.autograd.backward(precision.scale_loss(loss))
        precision.unscale_gradients(optimizer)
        stepped = precision.optimizer_step(optimizer)
        assert isinstance(stepped, bool), "optimizer_step must return True, or False if skipped"
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed == stepped, (
            "optimizer_step returned True but no weight changed"
            if stepped
            else "optimizer_step returned False (skipped) but the weights changed"
        )

    def test_state_is_json_and_loads_back(self) -> None:
        precision = self._new()
        state = precision.state_dict()
        text = json.dumps(state)  # written to the checkpoint's precision.json
        other = self._new()
        other.load_state_dict(json.loads(text))
        assert other.state_dict() == state, "load_state_dict(state_dict()) changed the state"

    def test_trains_the_tiny_model(self) -> None:
        with scratch() as root:
            run = make_run(root, components={"precision": fresh(required(self, "precision"))})
            with run:
                initial = weights(run)
                run.fit()
                final = weights(run)
        assert run.state.step == 6
        assert any(not torch.equal(initial[k], v) for k, v in final.items()), "nothing trained"
        assert all(torch.isfinite(v).all() for v in final.values()), "non-finite weights"

    def test_resumes_bit_for_bit(self) -> None:
        spec = required(self, "precision")
        check_resume_exact(lambda: {"precision": fresh(spec)})
