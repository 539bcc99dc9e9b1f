from services.inference.scaling import PoolLimits, PoolState, desired_workers

ASYNC = PoolLimits(minimum=0, maximum=4, autoscaling=True, scale_down_after=60)


def state(queued=0, busy=0, current=0, idle=0.0) -> PoolState:
    return PoolState(queued=queued, busy=busy, current=current, idle_seconds=idle)


def test_without_autoscaling_the_pool_keeps_its_initial_size():
    fixed = PoolLimits(minimum=1, maximum=1, autoscaling=False)
    assert desired_workers(state(queued=50, current=2), fixed, initial=2) == 2
    assert desired_workers(state(), fixed, initial=2) == 2


def test_an_async_pool_at_zero_starts_a_worker_when_work_arrives():
    assert desired_workers(state(queued=1, current=0), ASYNC, initial=1) == 1


def test_the_pool_grows_with_the_backlog_up_to_its_maximum():
    assert desired_workers(state(queued=2, busy=1, current=1), ASYNC, initial=1) == 3
    assert desired_workers(state(queued=40, busy=2, current=2), ASYNC, initial=1) == 4


def test_a_recently_busy_pool_keeps_its_workers():
    assert desired_workers(state(current=3, idle=10), ASYNC, initial=1) == 3


def test_an_idle_pool_shrinks_to_its_minimum():
    assert desired_workers(state(current=3, idle=61), ASYNC, initial=1) == 0
    real_time = PoolLimits(minimum=1, maximum=4, autoscaling=True)
    assert desired_workers(state(current=3, idle=600), real_time, initial=1) == 1


def test_jobs_per_worker_spreads_the_backlog():
    batching = PoolLimits(minimum=0, maximum=10, autoscaling=True, jobs_per_worker=4)
    assert desired_workers(state(queued=9, current=1), batching, initial=1) == 3
