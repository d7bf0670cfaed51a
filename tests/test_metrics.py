"""dqid.metrics.Timings: the push-latency histogram's counts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dqid.metrics import PUSH_BUCKETS, Timings

seconds = st.one_of(st.sampled_from(PUSH_BUCKETS),
                    st.floats(min_value=0.0, max_value=100.0, allow_nan=False))


@given(st.lists(seconds, max_size=50))
def test_each_bucket_counts_the_observations_at_or_below_its_bound(observed):
    timings = Timings(PUSH_BUCKETS)
    for value in observed:
        timings.observe(value)
    family = timings.family("dqid_push_seconds", "doc")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    for bound in PUSH_BUCKETS:
        expected = sum(1 for value in observed if value <= bound)
        assert samples[("dqid_push_seconds_bucket", str(bound))] == expected
    assert samples[("dqid_push_seconds_bucket", "+Inf")] == len(observed)
    assert samples[("dqid_push_seconds_count", None)] == len(observed)
    assert abs(samples[("dqid_push_seconds_sum", None)] - sum(observed)) < 1e-9
