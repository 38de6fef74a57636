"""What the MLflow UI reads, checked through the MLflow client (no browser)."""

from __future__ import annotations

from segx import tracking


def test_experiments_are_marked_for_model_training_and_make_ui_prints_the_runs_url(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.connect(uri)
    exp = tracking.experiment_id(client, "fresh", None)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made elsewhere (plain MLflow) is marked when segx first uses it.
    other = client.create_experiment("made-by-hand")
    assert "mlflow.experimentKind" not in client.get_experiment(other).tags
    assert tracking.experiment_id(client, "made-by-hand", None) == other
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    text = tracking.ui_urls(uri, "http://127.0.0.1:5000")
    assert f"fresh: http://127.0.0.1:5000/#/experiments/{exp}?workflowType=machine_learning" in text
    assert "Default" not in text  # the empty default experiment is not offered
    assert "no runs yet" in tracking.ui_urls(f"sqlite:///{tmp_path}/none.db", "http://x")
    assert not (tmp_path / "none.db").exists()  # printing the URL never creates a store


def test_runs_say_who_made_them_what_they_are_and_what_was_chosen(ensemble_record, member_store):
    out, runs = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    member = client.get_run(runs["resnet18"])
    for run in (member, client.get_run(ensemble_record.run_id)):
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"]  # "Created by", "Source"
        assert tags["mlflow.note.content"].startswith("segx ")  # the UI's description
    assert "resnet18 encoder" in member.data.tags["mlflow.note.content"]
    ensemble = client.get_run(ensemble_record.run_id)
    params = ensemble.data.params
    assert params["chosen.threshold"] == str(ensemble_record.threshold)
    weights = {k: float(v) for k, v in params.items() if k.startswith("chosen.weight.")}
    assert len(weights) == 2
    for i, m in enumerate(ensemble_record.members):  # in member order, named by member
        (value,) = [v for k, v in weights.items() if k.startswith(f"chosen.weight.{i}.")]
        assert abs(value - m.weight) < 1e-5
    # The run is named for what won (a member alone, equal weights or the search), written out
    # here for this fixture's two members rather than rebuilt by the ensemble's own rule.
    expected = {
        "member:resnet18-unet": "ensemble-single-resnet18-unet-2m",
        "member:mobilenetv2-unet": "ensemble-single-mobilenetv2-unet-2m",
        "equal": "ensemble-equal-2m",
        "greedy": "ensemble-greedy-2m",
        "grid": "ensemble-grid-2m",
        "optimize": "ensemble-optimize-2m",
    }
    assert ensemble.info.run_name == expected[params["chosen.method"]]


def test_member_runs_carry_their_dataset_and_system_metrics(member_store):
    out, runs = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(runs["resnet18"])
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["segx.data_fingerprint"]
    assert dataset.tags[0].value == "training" and '"data.n_train"' in dataset.dataset.profile
    assert any(k.startswith("system/") for k in run.data.metrics)  # CPU, memory: MLflow's system metrics


def test_the_ensemble_names_its_members_logged_models_as_inputs(ensemble_record, member_store_copy):
    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    member_models = {}
    for run_id in runs.values():
        run = client.get_run(run_id)
        model = client.get_logged_model(run.data.tags["segx.logged_model_id"])
        assert model.source_run_id == run_id and "READY" in str(model.status)
        import mlflow

        member_info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert (
            member_info.signature is not None
            and member_info.saved_input_example_info["artifact_path"] == "input_example.json"
        )
        assert model.tags["segx.model_artifact"] == f"runs:/{run_id}/model"
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        member_models[run_id] = model.model_id
    ensemble = client.get_run(ensemble_record.run_id)
    inputs = {i.model_id for i in ensemble.inputs.model_inputs}
    assert inputs == {member_models[m.run_id] for m in ensemble_record.members}
    import mlflow

    # The ensemble's pyfunc takes a list of images of different sizes (a tensor signature would
    # make MLflow refuse that list, so it has none).
    import numpy as np

    model = mlflow.pyfunc.load_model(ensemble.data.tags["segx.pyfunc_uri"])
    rng = np.random.default_rng(0)
    masks = model.predict(
        [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)]
    )
    assert [m.shape for m in masks] == [(64, 64), (40, 72)]
