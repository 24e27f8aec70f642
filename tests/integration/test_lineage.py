"""The drafter registry against the real MLflow server: versions, champion moves, rollback, verified downloads."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from drafters.draft_lm import draft_from_target, load_draft, save_draft
from trainer.lineage import ArtifactError, Lineage, LineageError, promotion_message, registered_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lineage() -> Lineage:
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        pytest.fail("MLFLOW_TRACKING_URI must point at the local MLflow server (run under make test)")
    return Lineage()


@pytest.fixture(scope="module")
def drafts(tiny_model, tmp_path_factory) -> list[Path]:
    """Three different draft checkpoints of a tiny target (1, 2, 3 layers)."""
    folder = tiny_model("llama")
    root = tmp_path_factory.mktemp("drafts")
    out = []
    for n in (1, 2, 3):
        save_draft(draft_from_target(str(folder), n), root / f"d{n}", f"cut-{n}")
        out.append(root / f"d{n}")
    return out


def test_register_promote_rollback_and_fetch(lineage, drafts, tmp_path):
    name = registered_name(f"t{uuid.uuid4().hex[:8]}")
    assert lineage.by_alias(name) is None and lineage.versions(name) == []
    v = [lineage.register(name, d, tags={"parent": "none", "offsets": {"0": [0, 10]}}) for d in drafts]
    assert [x.version for x in v] == [1, 2, 3]
    assert v[0].tags["offsets"] == '{"0": [0, 10]}' and len({x.sha256 for x in v}) == 3
    with pytest.raises(LineageError):
        lineage.rollback(name)  # nothing was ever champion
    for x in v:
        assert lineage.promote(name, x.version).version == x.version
        assert lineage.by_alias(name).version == x.version
    lineage.set_alias(name, "challenger", 1)
    listed = {x.version: x.aliases for x in lineage.versions(name)}
    assert listed == {1: ("challenger",), 2: (), 3: ("champion",)}
    assert lineage.rollback(name).version == 2 and lineage.by_alias(name).version == 2
    assert lineage.rollback(name).version == 1
    with pytest.raises(LineageError):
        lineage.rollback(name)
    folder = lineage.fetch(lineage.by_alias(name), tmp_path)
    model, version = load_draft(folder)
    assert version == "cut-1" and model.cfg.num_layers == 1
    msg = promotion_message(v[2])
    assert (msg.name, msg.version, msg.model_uri, msg.sha256) == (name, "3", f"models:/{name}/3", v[2].sha256)


def test_bad_artifacts_are_refused_and_nothing_half_written_is_registered(lineage, drafts, tmp_path):
    name = registered_name(f"t{uuid.uuid4().hex[:8]}")
    good = lineage.register(name, drafts[0])
    with pytest.raises(ArtifactError):  # the weights changed after they were scored
        lineage.register(name, drafts[1], tags={"sha256": good.sha256})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((drafts[1] / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError):  # no draft.json: an incomplete checkpoint
        lineage.register(name, broken)
    assert [x.version for x in lineage.versions(name)] == [1]
    # A version whose recorded digest does not match its bytes (a corrupt upload) is never handed out.
    mv = lineage.client.create_model_version(name, source=good.source_uri, tags={"sha256": "0" * 64},
                                             model_id=good.source_uri.removeprefix("models:/"))
    with pytest.raises(ArtifactError, match="sha256"):
        lineage.fetch(lineage.get(name, int(mv.version)), tmp_path / "dl")
    assert not any(p.name.endswith(f"v{mv.version}") for p in (tmp_path / "dl").iterdir())


def test_concurrent_fetches_into_one_folder_never_pull_a_loaded_copy_away(lineage, drafts, tmp_path):
    """Replicas may share a download folder: a fetch that finishes second must keep the first's copy."""
    from concurrent.futures import ThreadPoolExecutor

    from trainer.lineage import weights_sha256

    name = registered_name(f"t{uuid.uuid4().hex[:8]}")
    v = lineage.register(name, drafts[2])

    def fetch_and_read(_):
        folder = lineage.fetch(v, tmp_path)
        return [weights_sha256(folder) for _ in range(20)]  # still whole while others finish

    with ThreadPoolExecutor(6) as pool:
        digests = [d for run in pool.map(fetch_and_read, range(6)) for d in run]
    assert digests == [v.sha256] * 120
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [f"{name}-v{v.version}"]
