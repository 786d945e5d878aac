from bench.soak import Tally, markdown, summary


def test_the_soak_report_counts_losses_and_tracks_growth_past_warm_up() -> None:
    tally = Tally(served=90, refused=20, kills=["prefill at 10:00:00", "decode at 10:04:00"])
    tally.lose("503 replica lost")
    samples = [{"t_s": 10 * i, "rss_mib": 1000.0 + i, "engine_shm_mib": 400.0, "store_shm_mib": 512.0,
                "redis_keys": 100 + i} for i in range(10)]
    s = summary(tally, samples, sent=111, elapsed_s=600)
    assert (s["requests"], s["served"], s["lost"], s["bad_inputs_refused"], s["minutes"]) == (111, 90, 1, 20, 10.0)
    assert s["rss_mib"] == {"first_warm": 1002.0, "last": 1009.0, "max": 1009.0}  # warm: past the first fifth
    assert s["lost_examples"] == ["503 replica lost"]
    table = markdown(s)
    assert "| requests lost (target 0) | 1 |" in table and "| replica kills | 2 |" in table
    assert "| Redis keys: warm / last / max | 102 / 109 / 109 |" in table
