"""Which features combine (hyprstream.fog.composition): the rule set answers for every combination, the
table in docs/fog.md is its output, every family that runs names the tests that cover it, and
`config validate` refuses every combination a fog config or an experiment can ask for that does not
run, in one line under the key to change. The last tests cover families no other test ran: real fog
rounds over an in-process grid whose agents send fixed deltas, at a real core."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from hyprstream.cli import main
from hyprstream.codec import Encoding, encoded_nbytes
from hyprstream.fog.composition import (
    CLIENT_DP,
    FAMILIES,
    ROBUST_WITH_SECAGG,
    Aggregate,
    Cell,
    Dp,
    Participants,
    Where,
    all_cells,
    conflict,
    family_of,
    refusal,
    table,
)
from hyprstream.fog.config import RoundMode
from hyprstream.fog.engine import run_buffered
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.secagg_messages import SECAGG_ACTION, Stage
from hyprstream.privacy.secagg_mod import make_secagg_mod
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest
from hyprstream.store.layer_table import layer_of
from hyprstream.telemetry.records import Strategy

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "fog.md"
BEGIN, END = "<!-- composition:begin -->", "<!-- composition:end -->"

# The tests that cover each family that runs (Family.id). A family's cells differ in features the tests
# name one by one: DP-SGD lives on the device (the fog is handed an ordinary delta), a telemetry choice
# only narrows the agents a round is sent to.
TESTS: dict[str, tuple[str, ...]] = {
    "fog: plain rounds": (
        "tests/fog/test_partial_updates.py::test_partial_updates_are_averaged_per_layer_group",
        "tests/sim/test_int8_round.py::test_int8_round",  # the fog's aggregator asks for and decodes int8
        "tests/fog/test_composition.py::test_the_fog_config_asks_its_rounds_for_its_update_encoding",
        "tests/fog/test_composition.py::test_a_robust_round_takes_each_groups_median_over_the_agents_that_trained_it",
        "tests/test_aggregate.py::test_robust_rules_by_hand",
        "tests/fog/test_fleet.py::test_fog_rounds_choose_from_the_fleet_view_and_serve_offload",
        "tests/fog/test_selection.py::test_never_selects_an_excluded_device_and_is_deterministic",
        "tests/agent/test_train.py::test_dpsgd_rounds_charge_the_ledger_and_compose_across_restarts",
    ),
    "fog: hybrid devices in plain rounds": (
        "tests/fog/test_partial_updates.py::test_partial_updates_are_averaged_per_layer_group",
        "tests/fog/test_composition.py::test_a_robust_round_takes_each_groups_median_over_the_agents_that_trained_it",
    ),
    "fog: secure rounds": (
        "tests/privacy/test_secagg_workflow.py::test_secure_round_pushes_exactly_the_mean_of_the_quantized_deltas",
        "tests/fog/test_composition.py::test_an_int8_secure_round_sums_in_a_16_bit_field_with_half_the_masked_uplink",
        "tests/fog/test_composition.py::test_a_secure_round_over_the_agents_a_selection_chose",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[fashion-mnist-private]",  # + DP-SGD
    ),
    "fog: hybrid devices in secure rounds": (
        "tests/privacy/test_secagg_workflow.py::test_a_device_training_fewer_layer_groups_takes_part_in_a_secure_round",
        # a hybrid device in an int8 secure round (the test's int8 cases, with client-level DP on top)
        "tests/fog/test_composition.py::test_a_hybrid_device_takes_part_in_a_client_level_dp_round",
        "tests/privacy/test_secagg_workflow.py::test_a_secure_round_no_survivor_trained_a_group_of_pushes_the_others",
    ),
    "fog: client-level DP": (
        "tests/privacy/test_secagg_workflow.py::test_central_client_dp_charges_the_model_ledger_and_binds_the_version",
        "tests/privacy/test_secagg_workflow.py::test_distributed_noise_is_not_released_below_its_client_count",
        "tests/fog/test_fog_privacy_rounds.py::test_private_rounds_follow_the_fleet_and_the_budget_survives_a_restart",
        ("tests/fog/test_fog_privacy_deploy.py::"
         "test_fog_runs_round_robin_rounds_over_supernodes_with_secure_aggregation_and_client_dp"),
        "tests/fog/test_composition.py::test_a_hybrid_device_takes_part_in_a_client_level_dp_round",
    ),
    "fog: client-level DP, the fog clipping and noising a plain round": (
        # each delta clipped over the groups it trained (a hybrid device's others count as zeros), the seeded
        # noise, the fixed denominator, the epsilon against dp-accounting
        "tests/privacy/test_client_dp_plain.py::"
        "test_a_plain_round_releases_the_clipped_sum_plus_noise_over_the_fixed_denominator",
        "tests/privacy/test_client_dp_plain.py::test_adding_or_removing_one_agent_moves_the_clipped_sum_by_at_most_the_clip",
        "tests/privacy/test_client_dp_plain.py::test_the_budget_stops_plain_private_rounds",
        # a telemetry sample's rates and denominator: the same ClientDpRounds as a secure round's
        "tests/fog/test_fog_privacy_selection.py::"
        "test_a_client_dp_round_samples_at_the_telemetry_rates_and_divides_by_their_sum",
        "tests/privacy/test_client_dp_plain.py::test_int8_replies_are_clipped_as_the_fog_decodes_them",
    ),
    "fog: client-level DP over a telemetry-weighted sample": (
        "tests/fog/test_fleet.py::test_with_client_dp_the_fleet_weights_a_poisson_sample_instead_of_choosing",
        "tests/fog/test_fog_privacy_selection.py::"
        "test_telemetry_rates_are_each_devices_own_and_never_above_the_charged_rate",
        "tests/fog/test_fog_privacy_selection.py::"
        "test_a_client_dp_round_samples_at_the_telemetry_rates_and_divides_by_their_sum",
    ),
    "fog: secure buffered cohorts": (
        "tests/fog/test_composition.py::"
        "test_a_buffered_fog_aggregates_each_cohort_securely_with_public_staleness_weights",
        "tests/fog/test_fog_privacy_rounds.py::test_buffered_rounds_with_secure_aggregation_push_cohort_means",
    ),
    "fog: buffered client-level DP, each push clipped and noised by the fog": (
        "tests/privacy/test_client_dp_buffered.py::"
        "test_each_push_releases_the_clipped_discounted_sum_plus_noise_over_buffer_k",
        "tests/privacy/test_client_dp_buffered.py::test_the_budget_finishes_a_private_buffered_fog",
        "tests/privacy/test_client_dp_buffered.py::test_a_refused_update_keeps_its_place_in_a_private_buffer_as_zeros",
        "tests/privacy/test_client_dp_buffered.py::"
        "test_replacing_one_agents_update_moves_the_discounted_sum_by_at_most_twice_the_clip",
        "tests/fog/test_fog_privacy_rounds.py::"
        "test_buffered_rounds_with_client_level_dp_noise_each_push_and_stop_at_the_budget",
        # hybrid devices' skipped groups count as zeros and int8 replies are clipped as decoded, as in plain
        # private rounds (the same FogAggregator._add and noised_mean)
        "tests/privacy/test_client_dp_plain.py::test_int8_replies_are_clipped_as_the_fog_decodes_them",
        "tests/fog/test_buffered.py::"
        "test_a_selection_decides_which_idle_agents_get_a_job_and_the_fog_waits_for_an_eligible_one",
    ),
    "fog: client-level DP over secure buffered cohorts": (
        "tests/fog/test_composition.py::test_secure_buffered_cohorts_release_client_level_dp_over_a_fixed_denominator",
        "tests/fog/test_fog_privacy_rounds.py::"
        "test_secure_buffered_cohorts_with_client_level_dp_stop_at_the_budget",
        "tests/fog/test_composition.py::"
        "test_a_buffered_fog_aggregates_each_cohort_securely_with_public_staleness_weights",
        "tests/privacy/test_client_dp_buffered.py::"
        "test_replacing_one_agents_update_moves_the_discounted_sum_by_at_most_twice_the_clip",
    ),
    "sim: client-level DP over secure buffered cohorts": (
        # the simulator's buffered fogs are the same BufferedFog around the same SecureFogAggregator, its rounds
        # set up by the same hyprstream.fog.engine.buffered_privacy
        "tests/fog/test_composition.py::test_secure_buffered_cohorts_release_client_level_dp_over_a_fixed_denominator",
        "tests/sim/test_buffered_sim.py::test_buffered_run_with_client_dp_charges_each_push_as_a_gaussian_release",
    ),
    "sim: buffered client-level DP, each push clipped and noised by the fog": (
        "tests/sim/test_buffered_sim.py::test_buffered_run_with_client_dp_charges_each_push_as_a_gaussian_release",
        "tests/privacy/test_client_dp_buffered.py::"
        "test_each_push_releases_the_clipped_discounted_sum_plus_noise_over_buffer_k",
        "tests/sim/test_buffered_sim.py::test_buffered_run_offers_jobs_by_each_devices_state_and_a_telemetry_choice",
    ),
    "fog: buffered": (
        "tests/fog/test_buffered.py::"
        "test_a_selection_decides_which_idle_agents_get_a_job_and_the_fog_waits_for_an_eligible_one",
        "tests/fog/test_fleet.py::test_a_buffered_fog_sends_jobs_only_to_the_agents_its_fleet_view_chooses",
        "tests/fog/test_composition.py::test_a_buffered_fog_takes_a_robust_rule_over_each_buffer",
        "tests/fog/test_buffered.py::test_pushes_every_k_updates_with_staleness_weighted_mean",
        "tests/fog/test_buffered.py::test_run_fog_in_buffered_mode_pushes_every_k_updates",
        "tests/fog/test_composition.py::test_a_buffered_fog_averages_each_group_over_the_agents_that_trained_it",
        "tests/fog/test_composition.py::test_a_buffered_fog_asks_for_and_decodes_int8_updates",
        "tests/agent/test_train.py::test_dpsgd_rounds_charge_the_ledger_and_compose_across_restarts",
    ),
    "sim: sync steps": (
        "tests/sim/test_robust_sim.py::test_a_median_step_takes_other_deltas_than_the_mean_from_the_same_start",
        "tests/sim/test_simulate.py::test_accuracy_and_versions",
        "tests/sim/test_simulate.py::test_only_online_devices_outside_minimal_are_asked_to_train",
        "tests/sim/test_strategies.py::test_a_simulated_agent_serves_requests_as_its_strategy_allows",
        "tests/sim/test_int8_round.py::test_int8_round",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[fashion-mnist-int8]",
        "tests/agent/test_train.py::test_simulated_devices_train_with_the_experiments_dpsgd",
    ),
    "sim: sync steps over a telemetry choice": (
        "tests/sim/test_sim_selection.py::test_the_simulated_view_reports_each_devices_state_and_the_selector_follows_it",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[fleet-selection]",
        # what the choice narrows runs as in "sim: sync steps"; robust rules and DP-SGD act per update
        "tests/sim/test_robust_sim.py::test_a_median_step_takes_other_deltas_than_the_mean_from_the_same_start",
        "tests/agent/test_train.py::test_simulated_devices_train_with_the_experiments_dpsgd",
    ),
    "sim: secure steps over a telemetry choice": (
        "tests/sim/test_sim_selection.py::test_secure_steps_with_client_dp_sample_at_each_devices_telemetry_rate",
        "tests/fog/test_composition.py::test_a_secure_round_over_the_agents_a_selection_chose",
    ),
    "sim: client-level DP on plain steps": (
        "tests/sim/test_sim_client_dp.py::test_plain_steps_with_client_dp_release_noise_calibrated_to_the_fogs_clip",
        "tests/privacy/test_client_dp_plain.py::"
        "test_a_plain_round_releases_the_clipped_sum_plus_noise_over_the_fixed_denominator",
    ),
    "sim: secure steps": (
        "tests/fog/test_composition.py::test_an_int8_secure_round_sums_in_a_16_bit_field_with_half_the_masked_uplink",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[fashion-mnist-secagg]",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[fashion-mnist-private]",
        "tests/sim/test_experiments.py::test_shipped_experiment_runs_reduced[digits-client-dp]",
        # the simulator's fogs are the same SecureFogAggregator
        "tests/privacy/test_secagg_workflow.py::test_distributed_noise_is_not_released_below_its_client_count",
        "tests/privacy/test_secagg_workflow.py::test_a_device_training_fewer_layer_groups_takes_part_in_a_secure_round",
        "tests/sim/test_strategies.py::test_a_simulated_agent_serves_requests_as_its_strategy_allows",
    ),
    "sim: secure buffered cohorts": (
        # the simulator's buffered fogs are the same BufferedFog around the same SecureFogAggregator, offering
        # jobs by the devices' state and the telemetry choice as in the plain buffered mode
        "tests/fog/test_composition.py::"
        "test_a_buffered_fog_aggregates_each_cohort_securely_with_public_staleness_weights",
        "tests/sim/test_buffered_sim.py::test_buffered_run_offers_jobs_by_each_devices_state_and_a_telemetry_choice",
        "tests/fog/test_buffered.py::"
        "test_on_a_virtual_clock_a_selection_waits_in_simulated_time_and_gives_up_after_max_wait",
    ),
    "sim: buffered": (
        # the simulator's buffered fogs run the same BufferedFog with the experiment's training.aggregation
        "tests/fog/test_composition.py::test_a_buffered_fog_takes_a_robust_rule_over_each_buffer",
        "tests/sim/test_buffered_sim.py::test_buffered_run_writes_metrics",
        "tests/sim/test_buffered_sim.py::test_job_duration_by_hand",
        "tests/fog/test_composition.py::test_a_buffered_fog_asks_for_and_decodes_int8_updates",
        "tests/sim/test_buffered_sim.py::test_buffered_run_with_dpsgd_charges_every_trained_update_and_reports_each_step",
        # devices with state (trace, batteries, hybrid and minimal strategies) and a telemetry choice
        "tests/sim/test_buffered_sim.py::test_buffered_run_offers_jobs_by_each_devices_state_and_a_telemetry_choice",
        "tests/sim/test_strategies.py::"
        "test_on_the_buffered_clock_a_battery_charges_with_time_drains_with_work_and_sets_the_strategy",
        "tests/fog/test_buffered.py::"
        "test_on_a_virtual_clock_a_selection_waits_in_simulated_time_and_gives_up_after_max_wait",
    ),
}


# ------------------------------------------------------------------------------------ the rule set
@pytest.mark.unit
def test_the_cells_are_the_full_product_of_the_axes():
    cells = all_cells()
    assert len(cells) == len(set(cells)) == 2 * 3 * 4 * 2 * 2 * 2
    with pytest.raises(ValueError, match="full or hybrid"):
        Cell(devices=Strategy.MINIMAL)


@pytest.mark.unit
@pytest.mark.parametrize("where", list(Where), ids=lambda w: w.value)
def test_the_families_hold_exactly_the_cells_that_run(where):
    for cell in all_cells():
        holding = [f for f in FAMILIES if f.at is where and cell in f.when]
        assert len(holding) == (1 if conflict(cell, where) is None else 0), (cell, holding, conflict(cell, where))
        assert family_of(cell, where.value) == (holding[0] if holding else None)


@pytest.mark.unit
def test_what_the_fog_and_the_simulator_run():
    fog, sim = Where.FOG, Where.SIM
    assert conflict(Cell(), fog) is None and conflict(Cell(), sim) is None  # plain sync rounds
    for where in Where:  # DP-SGD is the devices' own
        assert conflict(Cell(RoundMode.BUFFERED, dp=Dp.DPSGD), where) is None
    for where in Where:
        assert conflict(Cell(encoding=Encoding.INT8), where) is None
        for dp in (Dp.NONE, Dp.CENTRAL, Dp.DISTRIBUTED):  # int8 + SecAgg+: a 16-bit field
            assert conflict(Cell(aggregation=Aggregate.SECAGG, dp=dp, encoding=Encoding.INT8), where) is None
    assert conflict(Cell(aggregation=Aggregate.SECAGG, dp=Dp.DISTRIBUTED), sim) is None
    for where in Where:  # the simulator's buffered mode models the devices' state too
        assert conflict(Cell(RoundMode.BUFFERED, devices=Strategy.HYBRID), where) is None
        assert conflict(Cell(RoundMode.BUFFERED, aggregation=Aggregate.SECAGG, participants=Participants.SELECTED,
                             devices=Strategy.HYBRID), where) is None
    assert set(all_cells()) == {c for c in all_cells() if (conflict(c, fog) is None) == (conflict(c, sim) is None)}
    for where in Where:
        assert conflict(Cell(aggregation=Aggregate.SECAGG, dp=Dp.CENTRAL, devices=Strategy.HYBRID), where) is None
        # client-level DP on a plain round: the fog clips each delta and adds the noise; distributed noise
        # lives inside SecAgg+, and a robust rule's sensitivity is not the clip bound
        assert conflict(Cell(dp=Dp.CENTRAL), where) is None
        assert conflict(Cell(dp=Dp.CENTRAL, participants=Participants.SELECTED, devices=Strategy.HYBRID,
                             encoding=Encoding.INT8), where) is None
        assert "[privacy.secagg]" in conflict(Cell(dp=Dp.DISTRIBUTED), where)
        assert "calibrated to the mean" in conflict(Cell(aggregation=Aggregate.ROBUST, dp=Dp.CENTRAL), where)


@pytest.mark.unit
def test_docs_hold_the_generated_table():
    text = DOCS.read_text()
    assert text.count(BEGIN) == text.count(END) == 1
    between = text.split(BEGIN)[1].split(END)[0]
    assert between.strip("\n") == table().strip("\n"), "run: python -m hyprstream.fog.composition"


@pytest.mark.unit
def test_every_family_that_runs_names_tests_that_exist():
    assert set(TESTS) == {f.id for f in FAMILIES}
    for family, ids in TESTS.items():
        assert ids, family
        for node_id in ids:
            assert _exists(node_id), f"{family}: no test {node_id}"


def _exists(node_id: str) -> bool:
    """Whether ``path::function[param]`` names a test function in that file; a parameter id must be a
    literal of the file or a shipped experiment's name (simulations/<id>.toml)."""
    path, _, name = node_id.partition("::")
    name, _, param = name.partition("[")
    file = ROOT / path
    if not file.is_file():
        return False
    functions = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, ast.FunctionDef)}
    param = param.rstrip("]")
    return name in functions and (not param or param in file.read_text()
                                  or (ROOT / "simulations" / f"{param}.toml").is_file())


# ------------------------------------------------------------------------------------ config validate
def fog_toml(cell: Cell, path: Path) -> Path:
    """A fog config that asks for ``cell`` (full devices: a device's strategy is its own)."""
    token = path.parent / "fog.token"
    token.write_text("fog\n")
    lines = ['kind = "fog"', 'name = "fog-a"', "[core]", 'location = "grpc://127.0.0.1:1"',
             f'token_file = "{token}"', 'model = "m"', "[rounds]", f'mode = "{cell.schedule.value}"',
             f'aggregation = "{"median" if cell.aggregation is Aggregate.ROBUST else "mean"}"',
             f'update_encoding = "{cell.encoding.value}"']
    if cell.participants is Participants.SELECTED:
        lines += ["[fleet]", 'fleet = "plant-7"', 'mqtt_host = "127.0.0.1"', "clients_per_round = 2"]
    lines += _privacy(cell)
    path.write_text("\n".join(lines) + "\n")
    return path


def experiment_toml(cell: Cell, path: Path) -> Path:
    """An experiment that asks for ``cell`` (the mean, the median or SecAgg+, every agent, full devices)."""
    lines = ['kind = "experiment"', 'name = "x"', "[training]", f'mode = "{cell.schedule.value}"',
             f'update_encoding = "{cell.encoding.value}"',
             f'aggregation = "{"median" if cell.aggregation is Aggregate.ROBUST else "mean"}"', *_privacy(cell)]
    if cell.dp is Dp.DPSGD:
        lines += ["[privacy.dpsgd]", "noise_multiplier = 1.0", "max_grad_norm = 1.0", "epsilon_budget = 8.0",
                  "delta = 1e-5"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _privacy(cell: Cell) -> list[str]:
    lines = ["[privacy.secagg]", "clip = 1.0"] if cell.aggregation is Aggregate.SECAGG else []
    if cell.dp in CLIENT_DP:
        lines += ["[privacy.client_dp]", "noise_multiplier = 1.0", f'placement = "{cell.dp.value}"']
        if cell.aggregation is not Aggregate.SECAGG:  # the fog clips each delta itself
            lines.append("clip = 1.0")
    return lines


FOG_CELLS = [c for c in all_cells() if c.devices is Strategy.FULL and c.dp is not Dp.DPSGD]
SIM_CELLS = [c for c in all_cells() if c.devices is Strategy.FULL and c.participants is Participants.ALL]


def _id(cell: Cell) -> str:
    return "-".join(getattr(cell, axis).value for axis in ("schedule", "aggregation", "dp", "participants",
                                                            "encoding"))


def validate(path: Path, capsys) -> tuple[int, list[str], list[str]]:
    rc = main(["config", "validate", str(path)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def _check_validate(cell: Cell, where: Where, path: Path, capsys) -> None:
    rc, out, err = validate(path, capsys)
    rule = refusal(cell, where)
    if rule is None:
        assert (rc, err) == (0, []), err
        return
    assert rule.key(where), f"{rule.name}: a config asks for it, so it needs a key"
    assert (rc, out) == (2, []) and err == [f"invalid {path}: {rule.key(where)}: {rule.reason}"], err


@pytest.mark.unit
@pytest.mark.parametrize("cell", FOG_CELLS, ids=_id)
def test_config_validate_of_a_fog_config_answers_as_the_rules(cell, tmp_path, capsys):
    _check_validate(cell, Where.FOG, fog_toml(cell, tmp_path / "fog.toml"), capsys)


@pytest.mark.unit
@pytest.mark.parametrize("cell", SIM_CELLS, ids=_id)
def test_config_validate_of_an_experiment_answers_as_the_rules(cell, tmp_path, capsys):
    _check_validate(cell, Where.SIM, experiment_toml(cell, tmp_path / "experiment.toml"), capsys)


@pytest.mark.unit
def test_a_robust_rule_with_secure_aggregation_is_one_conflict(tmp_path, capsys):
    for mode in ("sync", "buffered"):
        path = fog_toml(Cell(RoundMode(mode), Aggregate.SECAGG), tmp_path / f"{mode}.toml")
        path.write_text(path.read_text().replace('aggregation = "mean"', 'aggregation = "trimmed_mean"'))
        assert validate(path, capsys)[1:] == ([], [f"invalid {path}: rounds.aggregation: {ROBUST_WITH_SECAGG}"])


@pytest.mark.unit
def test_dp_sgd_in_a_fog_config_is_refused_not_ignored(tmp_path, capsys):
    """DP-SGD is the devices' (their profiles); a fog config asking for it would otherwise promise a guarantee
    nothing applies."""
    path = fog_toml(Cell(), tmp_path / "fog.toml")
    path.write_text(path.read_text() + "[privacy.dpsgd]\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n")
    rc, out, err = validate(path, capsys)
    assert (rc, out) == (2, []) and len(err) == 1, err
    assert err[0].startswith(f"invalid {path}: privacy.dpsgd: sample-level DP-SGD runs on the devices"), err


@pytest.mark.unit
def test_dp_sgd_and_client_dp_together_are_checked_each(tmp_path, capsys):
    sync = experiment_toml(Cell(aggregation=Aggregate.SECAGG, dp=Dp.DPSGD), tmp_path / "sync.toml")
    sync.write_text(sync.read_text() + '[privacy.client_dp]\nnoise_multiplier = 1.0\n')
    assert validate(sync, capsys)[0] == 0
    buffered = tmp_path / "buffered.toml"
    buffered.write_text(sync.read_text().replace('mode = "sync"', 'mode = "buffered"'))
    # DP-SGD with secure buffered cohorts runs, and so does client-level DP over them (and over plain pushes)
    for aggregation in (Aggregate.SECAGG, Aggregate.MEAN):
        assert conflict(Cell(RoundMode.BUFFERED, aggregation, Dp.DPSGD), Where.SIM) is None
        assert conflict(Cell(RoundMode.BUFFERED, aggregation, Dp.CENTRAL), Where.SIM) is None
    assert validate(buffered, capsys)[0] == 0
    # what stays refused is the mathematics: distributed noise outside SecAgg+, client-level DP on a robust rule
    assert "[privacy.secagg]" in conflict(Cell(RoundMode.BUFFERED, Aggregate.MEAN, Dp.DISTRIBUTED), Where.SIM)
    assert "calibrated to the mean" in conflict(Cell(RoundMode.BUFFERED, Aggregate.ROBUST, Dp.CENTRAL), Where.SIM)


# ------------------------------------------------------------------------------------ covering rounds
app = ClientApp()


def fixed_reply(request: TrainRequest, context) -> TrainReply:
    """Every entry of the delta is the node's ``value``; a ``hybrid`` node trains the last group only."""
    cfg = context.node_config
    layers = request.layers[-1:] if cfg.get("hybrid") else request.layers
    delta = {name: np.full(np.shape(w), float(cfg["value"]), np.float32) for name, w in request.weights.items()
             if layer_of(name) in layers}
    return TrainReply(ReplyStatus.OK, request.model_version, tuple(layers), delta, num_examples=int(cfg["examples"]),
                      encoding=request.update_encoding, encoding_seed=request.seed)


@app.train("layerwise")
def _train(msg: Message, context) -> Message:
    return Message(fixed_reply(TrainRequest.from_content(msg.content), context).to_content(), reply_to=msg)


secure_app = ClientApp()  # the same handler behind the secure-aggregation middleware, as the agent wires it
secure_app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=False)])(_train)


def _fog(site, nodes: dict[int, dict], client_app=app, **plan):
    from hyprstream.coreapi.client import CoreClient
    from hyprstream.fog.aggregator import FogAggregator, RoundPlan
    from hyprstream.fog.loopback import LoopbackGrid

    grid = LoopbackGrid(client_app, list(nodes), node_config=nodes.__getitem__)
    core = CoreClient(site.location, "fog")
    plan = RoundPlan(task="digits", local_steps=1, batch_size=1, lr=0.1, timeout_s=5.0, **plan)
    return FogAggregator("fog-a", grid, list(nodes), core, "m", plan), core


def _moved(core, base) -> dict[str, np.ndarray]:
    """How far each parameter of the master moved from ``base`` (one value per parameter, checked uniform)."""
    from hyprstream.store import to_arrays

    before, after = to_arrays(base.table), to_arrays(core.get_weights("m").table)
    moved = {}
    for name in before:
        step = after[name].astype(np.float64) - before[name]
        np.testing.assert_allclose(step, step.flat[0], atol=1e-6)
        moved[name] = float(step.flat[0])
    return moved


HYBRID_SITE = {1: {"value": 0.1, "examples": 10}, 2: {"value": 0.2, "examples": 30},
               3: {"value": 0.6, "examples": 20, "hybrid": 1}}


@pytest.mark.integration
def test_a_robust_round_takes_each_groups_median_over_the_agents_that_trained_it(site):
    from hyprstream.fog.aggregate import Aggregation

    fog, core = _fog(site, HYBRID_SITE, layers=("fc2", "head"), aggregation=Aggregation.MEDIAN)
    with core:
        base = fog.pull()
        result = fog.run_round(1, base)
        moved = _moved(core, base)
    assert (result.participants, result.refused, result.version) == (3, 0, 1)
    assert moved["fc2.weight"] == pytest.approx(0.15, abs=1e-6)  # nodes 1 and 2: the hybrid one trained head only
    assert moved["head.bias"] == pytest.approx(0.2, abs=1e-6)  # the median of 0.1, 0.2 and 0.6, not a mean
    assert moved["fc1.weight"] == 0.0


@pytest.mark.integration
def test_a_buffered_fog_averages_each_group_over_the_agents_that_trained_it(site):
    from hyprstream.fog.buffered import BufferedFog

    fog, core = _fog(site, HYBRID_SITE, layers=("fc2", "head"))
    with core:
        base = fog.pull()
        (push,) = run_buffered([BufferedFog(fog, buffer_k=3, max_staleness=0, concurrency=3)], max_pushes=1)
        moved = _moved(core, base)
    assert push.contributors == (1, 2, 3) and push.layers == ("fc2", "head") and push.version == 1
    assert moved["fc2.weight"] == pytest.approx((10 * 0.1 + 30 * 0.2) / 40, abs=1e-6)
    assert moved["head.weight"] == pytest.approx((10 * 0.1 + 30 * 0.2 + 20 * 0.6) / 60, abs=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_buffered_fog_takes_a_robust_rule_over_each_buffer(site, rule):
    """buffered + robust: each buffer's rows combined by the plan's rule (unweighted, as in a sync round), so
    one far-off update moves the push no more than the rule allows; a failing installed rule costs the push."""
    from hyprstream.fog.aggregate import Aggregation, resolve_rule
    from hyprstream.fog.buffered import BufferedFog

    nodes = {1: {"value": 0.001, "examples": 1}, 2: {"value": 0.002, "examples": 50},
             3: {"value": 0.003, "examples": 1}, 4: {"value": 5.0, "examples": 1}}  # agent 4: far off
    fog, core = _fog(site, nodes, layers=("head",), aggregation=resolve_rule(rule), trim_fraction=0.25)
    with core:
        base = fog.pull()
        (push,) = run_buffered([BufferedFog(fog, buffer_k=4, max_staleness=0, concurrency=4)], max_pushes=1)
        moved = _moved(core, base)
    assert push.contributors == (1, 2, 3, 4) and push.version == 1
    # median of (0.001, 0.002, 0.003, 5.0): 0.0025; trimmed by one at each end: the same two in the middle
    assert moved["head.weight"] == pytest.approx(0.0025, abs=1e-6)
    assert fog.plan.aggregation is not Aggregation.MEAN


@pytest.mark.integration
def test_a_buffered_fog_asks_for_and_decodes_int8_updates(site):
    from hyprstream.fog.buffered import BufferedFog

    nodes = {1: {"value": 0.1, "examples": 10}, 2: {"value": 0.3, "examples": 30}}
    fog, core = _fog(site, nodes, layers=("head",), update_encoding="int8")
    with core:
        base = fog.pull()
        (push,) = run_buffered([BufferedFog(fog, buffer_k=2, max_staleness=0)], max_pushes=1)
        moved = _moved(core, base)
    int8 = sum(encoded_nbytes(shape, Encoding.INT8) for shape in ((10, 64), (10,)))
    assert push.bytes_up == 2 * int8  # int8 values and a scale per tensor, not float32
    assert moved["head.weight"] == pytest.approx((10 * 0.1 + 30 * 0.3) / 40, abs=1e-3)


@pytest.mark.integration
def test_a_secure_round_over_the_agents_a_selection_chose(site):
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom

    nodes = {1: {"value": 0.001, "examples": 1}, 2: {"value": 0.05, "examples": 1},
             3: {"value": 0.003, "examples": 1}}
    fog, core = _fog(site, nodes, secure_app, layers=("head",))
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0), source=SeededRandom(0))
    with core:
        base = fog.pull()
        result = secure.run_round(1, nodes=[1, 3])  # what the fog's selector chose
        moved = _moved(core, base)
    assert result.nodes == (1, 3) and result.contributors == (1, 3) and result.version == 1
    assert moved["head.weight"] == pytest.approx((0.001 + 0.003) / 2, abs=1e-5)  # node 2 was never asked
    assert re.fullmatch(r"[0-9a-f]{64}", secure.last.transcript_sha256)


@pytest.mark.integration
def test_an_int8_secure_round_sums_in_a_16_bit_field_with_half_the_masked_uplink(site):
    """int8 + SecAgg+: the clients quantize their clipped deltas into a 16-bit field, the fog unmasks the
    exact sum of those integers, and each masked vector is 2 bytes per parameter instead of 4."""
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.store import to_arrays

    nodes = {1: {"value": 0.001, "examples": 1}, 2: {"value": 0.002, "examples": 1},
             3: {"value": 0.006, "examples": 1}}
    runs = {}
    for encoding in ("fp32", "int8"):
        fog, core = _fog(site, nodes, secure_app, layers=(), update_encoding=encoding)
        secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0), source=SeededRandom(0))
        with core:
            base = fog.pull()
            result = secure.run_round(1)
            after = core.get_weights("m")
        assert result.version == after.version and result.contributors == (1, 2, 3), result.reasons
        before, now = to_arrays(base.table), to_arrays(after.table)
        runs[encoding] = (secure.field_bits, result, {n: now[n].astype(np.float64) - before[n] for n in before})

    dim = sum(d.size for d in runs["fp32"][2].values())
    assert (runs["fp32"][0], runs["int8"][0]) == (32, 16)
    resolution = 1.0 / (32767 // 3)  # clip / per-client bound of a 16-bit field over 3 clients
    for step in runs["int8"][2].values():
        # the mean of three stochastically rounded inputs: within one grid step of the true mean (0.003)
        np.testing.assert_allclose(step, 0.003, atol=resolution + 1e-6)
        assert np.ptp(step) > 0  # the grid is visible: a 16-bit field, not the 32-bit one
    for step in runs["fp32"][2].values():
        np.testing.assert_allclose(step, 0.003, atol=1e-6)
    # the masked vectors are the only messages whose size depends on the field: 2 bytes less per parameter
    # (and a few bytes less of padding, which aligns the vector to its element size)
    for node in nodes:
        saved = runs["fp32"][1].uplink[node] - runs["int8"][1].uplink[node]
        assert 2 * dim <= saved <= 2 * dim + 8, (saved, dim)
    assert runs["int8"][1].bytes_up < 0.51 * runs["fp32"][1].bytes_up


@pytest.mark.integration
def test_a_buffered_fog_aggregates_each_cohort_securely_with_public_staleness_weights(site):
    """buffered + SecAgg+: agents train and hold their deltas; each buffer of K is one secure round among
    them, each input scaled by its public staleness weight inside the protocol, the mean divided by the
    survivors' sum of weights. The fog never receives a delta in the clear."""
    from hyprstream.fog.buffered import BufferedFog
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom

    nodes = {1: {"value": 0.001, "examples": 5}, 2: {"value": 0.002, "examples": 7},
             3: {"value": 0.004, "examples": 9}, 4: {"value": 0.008, "examples": 11}}
    fog, core = _fog(site, nodes, secure_app, layers=("head",))
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0), source=SeededRandom(0))
    durations = {1: 1.0, 2: 1.0, 3: 1.5, 4: 5.0}  # simulated seconds of every job of each agent
    with core:
        base = fog.pull()
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=3, concurrency=4, secure=secure,
                               duration=lambda node, dispatch: durations[node])
        first, second = run_buffered([buffered], max_pushes=2)
        v1 = core.get_weights("m", version=1)
        moved = [_moved_between(base, v1), _moved(core, v1)]

    # t=1: agents 1 and 2 (version 0) fill the first buffer; t=1.5: agent 3 (version 0, one version stale);
    # t=2: agent 1 again (version 1) completes the second
    assert (first.contributors, first.staleness, first.version) == ((1, 2), (0, 0), 1)
    assert (second.contributors, second.staleness, second.version) == ((3, 1), (1, 0), 2)
    assert second.weights == pytest.approx((2 ** -0.5, 1.0))
    assert moved[0]["head.weight"] == pytest.approx((0.001 + 0.002) / 2, abs=1e-6)  # uniform: no example counts
    expected = (0.004 * 2 ** -0.5 + 0.001) / (2 ** -0.5 + 1.0)
    assert moved[1]["head.weight"] == pytest.approx(expected, abs=1e-6)
    assert first.train_loss != first.train_loss  # NaN: no loss leaves the devices either


@pytest.mark.integration
@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_secure_buffered_cohorts_release_client_level_dp_over_a_fixed_denominator(site, placement):
    """buffered + SecAgg+ + client-level DP: each cohort of K = 2 is one secure round whose sum (each input
    clipped, times its public staleness weight) gets N(0, (2zC)^2) per coordinate -- added by the fog after
    unmasking (central) or by the two clients inside the protocol (distributed) -- and is divided by K, not by
    the survivors' weights. Checked by hand: the release times K minus the weighted sum of the agents' known
    inputs is noise of mean 0 and std 2zC over the 650 coordinates; each push is charged as one Gaussian
    mechanism at rate 1 (dp-accounting's PLD to RDP), and core gets 0 participants."""
    import math

    import dp_accounting

    from hyprstream.fog.buffered import BufferedFog
    from hyprstream.fog.engine import buffered_privacy
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.config import ClientDpConfig, SecAggConfig
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.store import to_arrays

    z, clip = 0.5, 1.0
    nodes = {1: {"value": 0.001, "examples": 5}, 2: {"value": 0.002, "examples": 7},
             3: {"value": 0.004, "examples": 9}}
    fog, core = _fog(site, nodes, secure_app, layers=("head",))
    dp = ClientDpConfig(noise_multiplier=z, placement=placement, min_clients=2)
    secure = SecureFogAggregator(fog, SecAggConfig(clip=clip), dp, source=SeededRandom(0))
    durations = {1: 1.0, 2: 1.3, 3: 1.7}
    with core:
        versions = [fog.pull()]
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=3, secure=secure, private=buffered_privacy(secure),
                               duration=lambda node, dispatch: durations[node])
        pushes = []
        for push in run_buffered([buffered], max_pushes=3):
            pushes.append(push)
            versions.append(core.get_weights("m", version=push.version))
        lineage = {v["version"]: v for v in core.list_versions("m")}
    assert [p.version for p in pushes] == [1, 2, 3]
    for i, push in enumerate(pushes):
        assert len(set(push.contributors)) == 2 and push.participants == 2
        before, after = to_arrays(versions[i].table), to_arrays(versions[i + 1].table)
        signal = sum(w * nodes[n]["value"] for n, w in zip(push.contributors, push.weights, strict=True))
        noise = (after["head.weight"].astype(np.float64) - before["head.weight"]).ravel() * 2 - signal
        noise = np.concatenate([noise, (after["head.bias"].astype(np.float64) - before["head.bias"]) * 2 - signal])
        assert noise.size == 650
        assert abs(noise.mean()) < 5 * 2 * z * clip / math.sqrt(650)
        assert noise.std() == pytest.approx(2 * z * clip, rel=0.15)
    for version in (1, 2, 3):
        record = lineage[version]["privacy"]
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), version)
        pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(dp.delta)
        rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(dp.delta)
        assert pld * 0.999 <= record["epsilon"] <= rdp * 1.001
        assert record["sample_rate"] == 1.0 and record["sensitivity"] == 2 * clip
        assert record["expected_participants"] == 2.0 and lineage[version]["participants"] == 0


@pytest.mark.integration
def test_a_secure_cohort_that_cannot_finish_pushes_nothing_and_the_buffered_fog_goes_on(site):
    """A cohort whose secure round aborts (an agent silent at its setup leaves one survivor, fewer than
    min_clients) releases nothing; its agents are free again and the next cohort commits."""
    from hyprstream.fog.buffered import BufferedFog
    from hyprstream.fog.loopback import LoopbackGrid
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom

    nodes = {1: {"value": 0.001, "examples": 1}, 2: {"value": 0.003, "examples": 1},
             3: {"value": 0.5, "examples": 1}}
    silent = {"left": 1}  # agent 3 drops the first setup it is sent

    def drop(node, msg) -> bool:
        if node == 3 and silent["left"] and wire.header(msg.content).stage is Stage.SETUP:
            silent["left"] -= 1
            return True
        return False

    fog, core = _fog(site, nodes, secure_app, layers=("head",))
    fog.grid = LoopbackGrid(secure_app, list(nodes), node_config=nodes.__getitem__, drop=drop)
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0, stage_timeout_s=2.0), source=SeededRandom(0))
    durations = {1: 1.0, 2: 2.0, 3: 1.5}
    with core:
        base = fog.pull()
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=3, concurrency=3, secure=secure,
                               duration=lambda node, dispatch: durations[node])
        aborted, committed = run_buffered([buffered], max_pushes=2)
        moved = _moved(core, base)
    assert (aborted.contributors, aborted.version) == ((1, 3), None)
    assert any("abort" in r or "not released" in r for r in aborted.reasons), aborted.reasons
    assert committed.version == 1 and set(committed.contributors) == {1, 2}, committed.reasons
    assert moved["head.weight"] == pytest.approx((0.001 + 0.003) / 2, abs=1e-6)


def _moved_between(base, after) -> dict[str, float]:
    from hyprstream.store import to_arrays

    before, now = to_arrays(base.table), to_arrays(after.table)
    return {name: float((now[name].astype(np.float64) - before[name]).flat[0]) for name in before}


@pytest.mark.integration
@pytest.mark.parametrize("encoding", ["fp32", "int8"])
@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_a_hybrid_device_takes_part_in_a_client_level_dp_round(site, placement, encoding):
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.client_dp import NoisePlacement
    from hyprstream.privacy.config import ClientDpConfig, SecAggConfig
    from hyprstream.privacy.noise import SeededRandom

    nodes = {1: {"value": 0.001, "examples": 1}, 2: {"value": 0.002, "examples": 1},
             3: {"value": 0.003, "examples": 1, "hybrid": 1}}
    fog, core = _fog(site, nodes, secure_app, layers=("fc2", "head"), update_encoding=encoding)
    dp = ClientDpConfig(noise_multiplier=1.0, placement=NoisePlacement(placement))
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0), dp, source=SeededRandom(0))
    with core:
        base = fog.pull()
        result = secure.run_round(1)
        after = core.get_weights("m")
    assert (result.version, result.declined, result.contributors) == (1, 0, (1, 2, 3)), result.reasons
    assert secure.spent() > 0 and after.version == 1 and after.table.num_rows == base.table.num_rows


@pytest.mark.unit
@pytest.mark.parametrize("schedule", [RoundMode.SYNC, RoundMode.BUFFERED])
def test_the_fog_config_asks_its_rounds_for_its_update_encoding(schedule, tmp_path):
    """``rounds.update_encoding`` reaches the plan of sync and buffered rounds alike (the plan's request
    asks each agent for it; the aggregator decodes it: tests/sim/test_int8_round.py)."""
    from hyprstream.fog.config import load_fog_config
    from hyprstream.fog.server_app import round_plan

    cell = Cell(schedule, encoding=Encoding.INT8)
    cfg = load_fog_config(fog_toml(cell, tmp_path / "fog.toml"))
    plan = round_plan(cfg, ("fc2",))
    assert plan.update_encoding == "int8" and plan.layers == ("fc2",)
    assert cfg.cells() == (cell,)
