"""The checkpoint-store conformance suite: ``class TestMine(StoreConformance): store = Mine``.

It checks that the store keeps what the kernel hands it and gives it back: a run saving through
it resumes bit for bit, ``resume("auto")`` of an output holding no checkpoint is a fresh start,
a background save completes at ``finish``, a checkpoint it wrote verifies and is found again
through ``resolve``, and its weights load for inference.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from treadle.components import CheckpointStore
from treadle.testing._fit import check_resume_exact, fresh, make_run, required, scratch, weights
from treadle.testing.models import TinyModel

__all__ = ["StoreConformance"]


def _build(spec: Any) -> CheckpointStore:
    from treadle.registry import component as build

    store = build("store", fresh(spec), CheckpointStore)
    assert isinstance(store, CheckpointStore)
    return store


class StoreConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        store: the store: a class or zero-argument factory, an entry-point name, or a
            ``{"name": ..., **options}`` mapping.
        background: the store supports ``Config.save_async`` (``write(background=True)``).
    """

    store: ClassVar[Any] = None
    background: ClassVar[bool] = True

    def _spec(self) -> Any:
        return required(self, "store")

    def test_is_a_store_with_a_name(self) -> None:
        store = _build(self._spec())
        assert isinstance(store, CheckpointStore), f"{store!r} is not a treadle.CheckpointStore"
        assert isinstance(store.name, str) and store.name, "set the class attribute name"

    def test_resume_continues_bit_for_bit(self) -> None:
        spec = self._spec()
        check_resume_exact(lambda: {"store": fresh(spec)})

    def test_nothing_to_resume_is_a_fresh_start(self) -> None:
        components = {"store": fresh(self._spec())}
        with scratch() as root, make_run(root, resume="auto", components=components) as run:
            run.fit()
            assert run.resumed_from is None, "resume('auto') found a checkpoint in nothing"
            assert run.state.step == 6

    def test_a_written_checkpoint_verifies_resolves_and_loads(self) -> None:
        spec = self._spec()
        with scratch() as root:
            with make_run(root, save_at_end=True, components={"store": fresh(spec)}) as run:
                run.fit()
                saved, trained = run.last_checkpoint, weights(run)
            assert saved is not None, "fit(save_at_end=True) wrote no checkpoint"
            store = _build(spec)
            assert store.verify(saved) == [], f"the checkpoint {saved} does not verify"
            assert store.resolve(root) == saved, "resolve(output_dir) is not the newest checkpoint"
            model = TinyModel()
            store.load_weights(model, saved, strict=True, check=True)
            for name, tensor in model.state_dict().items():
                assert torch.equal(tensor, trained[name]), f"load_weights: {name} differs"

    def test_a_background_save_completes_at_finish(self) -> None:
        if not self.background:
            return
        spec = self._spec()
        with scratch() as root:
            components = {"store": fresh(spec), "checkpoint": "safetensors"}
            with make_run(root, components=components) as run:
                run.fit()
                run.config = run.config.replace(save_async=True)
                from treadle import checkpoint

                path = checkpoint.save(run, background=True)
                assert checkpoint.finish_pending(run) == path, "finish did not return the save"
                assert run.last_checkpoint == path
                assert _build(spec).verify(path) == []
