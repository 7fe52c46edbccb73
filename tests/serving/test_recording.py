"""Recording where robots run: `ActionStream(..., record=DIR)` on the robot side (every tick), `pi0 serve --record`
on the server side (every request and the chunk it got), both read back as LeRobot datasets."""

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from pi0.data.dataset import LeRobotDataset  # noqa: E402
from pi0.robot.policy import Policy  # noqa: E402
from pi0.serving.stream import ActionStream, SimulatedClock, SimulatedExecutor  # noqa: E402
from tests.conftest import write_policy_checkpoint  # noqa: E402


def robot_obs(tick: int, prompt: str = "put the cup in the bowl") -> dict:
    rng = np.random.default_rng(tick)
    return {"observation/image": np.full((48, 64, 3), 3 * tick % 256, np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (3, 32, 40), dtype=np.uint8),  # CHW, as some robots send
            "observation/state": np.array([tick, 0, 1, 2, 3, 4, 5, 6], np.float32), "prompt": prompt}


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer_path):
    ckpt = write_policy_checkpoint(tmp_path_factory.mktemp("ck"), "tiny", tokenizer_path)
    return Policy(ckpt, preset="libero", backend="engine", dtype="float32", seed=0)


def test_an_action_stream_records_every_tick(tmp_path, policy):
    clock = SimulatedClock()
    stream = ActionStream(policy, 10.0, refill_at=46, executor=SimulatedExecutor(clock, 0.25), clock=clock,
                          record=str(tmp_path / "rec"))
    executed = []
    for episode in range(2):
        for tick in range(12):
            executed.append(stream.next_action(robot_obs(tick)))
            clock.t += 0.1
        stream.end_episode(success=episode == 1)
    counts = stream.close()
    assert counts["episodes"] == 2 and counts["mismatched"] == 0 and counts["record_errors"] == 0
    ds = LeRobotDataset(tmp_path / "rec")
    assert ds.num_episodes == 2 and len(ds) == 24 and ds.fps == 10 and ds.tasks == ["put the cup in the bowl"]
    assert set(ds.camera_keys) == {"observation.images.image", "observation.images.wrist_image"}
    assert ds.shape("observation.images.wrist_image") == (32, 40, 3)  # stored HWC
    for i in (0, 5, 23):
        item = ds[i]
        assert np.array_equal(item["action"], executed[i]) and item["observation.state"][0] == i % 12
    chunks = ds.column("chunk_index").reshape(-1)
    assert chunks[0] == 0 and chunks[11] >= 1  # the ticks of later chunks say so
    assert ds.column("next.success").reshape(-1).sum() == 1


def test_a_tick_of_another_shape_is_skipped_not_raised(tmp_path, policy):
    stream = ActionStream(policy, 10.0, record=str(tmp_path / "rec"), on_empty="wait")
    stream.next_action(robot_obs(0))
    odd = {**robot_obs(1), "observation/state": np.zeros(8, np.float32)}
    odd["observation/image"] = np.zeros((24, 24, 3), np.uint8)  # another camera size
    stream.next_action(odd)  # the robot still gets its action
    counts = stream.close()
    assert counts["mismatched"] == 1 and LeRobotDataset(tmp_path / "rec").num_episodes == 1


def test_a_server_records_each_request_and_the_chunk_it_got(tmp_path, policy):
    """pi0 serve --record: one frame per answered request (its observation, the chunk's first action, the whole
    chunk), an episode per connection or up to episode_done; a bad request is not recorded."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from pi0.data.recorder import ObservationRecorder
    from tests.serving.test_server import Running

    running = Running(policy, recorder=ObservationRecorder(tmp_path / "rec", fps=10, info={"side": "server"}))
    try:
        a = WebsocketClientPolicy(host="127.0.0.1", port=running.port)
        chunks = [a.infer(robot_obs(0))["actions"]]
        chunks.append(a.infer({**robot_obs(1), "episode_done": True, "episode_success": True})["actions"])
        chunks.append(a.infer(robot_obs(2))["actions"])
        with pytest.raises(Exception):
            a.infer({**robot_obs(3), "observation/state": np.zeros(3, np.float32)})  # wrong width: not recorded
        b = WebsocketClientPolicy(host="127.0.0.1", port=running.port)
        chunks.append(b.infer(robot_obs(4))["actions"])
        a._ws.close()
        b._ws.close()
    finally:
        running.close()
    ds = LeRobotDataset(tmp_path / "rec")
    assert ds.num_episodes == 3 and len(ds) == 4  # [0, 1] (episode_done), [2] (connection closed), [4]
    assert sorted(e["length"] for e in ds.episodes) == [1, 1, 2]
    by_state = {int(ds[i]["observation.state"][0]): ds[i] for i in range(len(ds))}
    for tick, chunk in zip((0, 1, 2, 4), chunks):
        item = by_state[tick]
        assert np.allclose(item["action.chunk"], np.asarray(chunk).reshape(-1), atol=1e-6)
        assert np.allclose(item["action"], np.asarray(chunk)[0], atol=1e-6)
    assert bool(by_state[1]["next.success"]) and bool(by_state[1]["next.done"])


def test_recording_into_another_robots_dataset_is_said_once_and_the_robot_keeps_moving(tmp_path, policy):
    from tests.data.recording import record

    record(tmp_path / "other", 1)  # another robot's features there
    stream = ActionStream(policy, 10.0, record=str(tmp_path / "other"), on_empty="wait")
    for tick in range(3):
        assert stream.next_action(robot_obs(tick)).shape == (7,)
    counts = stream.close()
    assert "other features" in counts["error"] and counts["episodes"] == 0
    assert LeRobotDataset(tmp_path / "other").num_episodes == 1  # untouched
