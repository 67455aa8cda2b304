"""Pure-Python tests of the scheduler over the KV block pool (no tensors)."""

from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.scheduler import Scheduler
from encdec_cli.engine.sequence import Request, SamplingParams, SequenceGroup


def _group(order, enc_len=10, prompt=2, max_new=8, beams=1):
    p = SamplingParams(max_new_tokens=max_new, num_beams=beams)
    return SequenceGroup(Request([1] * enc_len, list(range(prompt)), p, order), enc_len, max_new, order)


def test_scheduler_admits_by_budget_and_preempts_newest():
    bm = BlockManager(12, 4)
    sched = Scheduler(EngineConfig(max_num_seqs=8, max_encoder_tokens=25, window=16), bm)
    groups = [_group(i) for i in range(4)]
    for g in groups:
        sched.add(g)
    plan = sched.schedule()
    # encoder budget 25 admits two requests of 10 tokens; each takes 3 cross + 1 self block
    assert plan.encode == groups[:2] and len(plan.decode) == 2
    assert bm.num_free == 12 - 8
    for s in plan.decode:  # pretend the step ran and produced tokens until blocks run out
        s.num_cached = len(s.tokens)
        s.tokens += [5] * 6
    plan = sched.schedule()  # the two running need 2 more blocks each; 4 free -> no preemption
    assert not plan.preempted
    for s in plan.decode:
        s.num_cached = len(s.tokens)
        s.tokens += [5] * 8  # 16 tokens -> 4 blocks each: 4 more needed, 2 free
    plan = sched.schedule()
    assert plan.preempted == [groups[1]] and sched.num_preemptions == 1
    assert groups[1] in sched.waiting and groups[1].cross_blocks == []
    sched.finish(groups[0])
    assert groups[0] not in sched.running


def test_scheduler_rejects_request_that_can_never_fit():
    bm = BlockManager(4, 4)
    sched = Scheduler(EngineConfig(), bm)
    g = _group(0, enc_len=40)
    sched.add(g)
    plan = sched.schedule()
    assert plan.failed and plan.failed[0][0] is g and "KV blocks" in plan.failed[0][1]
    assert sched.idle


def test_admission_waits_for_a_slice_of_the_pool():
    """With requests running, new ones are admitted once an eighth of the pool is free beyond
    the running sequences' headroom (batched encoder runs; steps in between run ahead), not one
    request per finished one; admits_next_step says whether the next schedule would admit."""
    bm = BlockManager(64, 4)
    sched = Scheduler(EngineConfig(max_num_seqs=32, max_encoder_tokens=1000, window=64), bm)
    groups = [_group(i) for i in range(20)]  # 3 cross + 1 prompt block each
    for g in groups:
        sched.add(g)
    assert sched.admits_next_step()  # nothing runs: admit
    plan = sched.schedule()
    running = plan.encode
    assert len(running) == 13 and bm.num_free == 64 - 13 * 4  # the 14th would eat the headroom
    assert not sched.admits_next_step()  # 12 free, 13 of them headroom
    sched.finish(running[0])  # 16 free, headroom 12: one request would fit, but 4 < 64 / 8
    assert not sched.admits_next_step()
    assert sched.schedule().encode == []
    sched.finish(running[1])  # 20 free, headroom 11: 9 >= 8
    assert sched.admits_next_step()
    assert sched.schedule().encode == groups[13:15]  # 4 + 4 + headroom 12 <= 20; a third would not fit
    assert not sched.admits_next_step()


def test_admission_not_paused_for_preempted_or_unfittable_requests():
    bm = BlockManager(40, 4)
    sched = Scheduler(EngineConfig(max_num_seqs=16, max_encoder_tokens=1000, window=16), bm)
    for i in range(10):
        sched.add(_group(i))
    assert len(sched.schedule().encode) == 8  # 8 x 4 blocks + 7 headroom <= 40
    assert not sched.admits_next_step()  # 8 free = the headroom: paused
    huge = _group(10, enc_len=200)  # 50 cross blocks: more than the pool
    sched.add(huge)
    assert sched.waiting[-1] is huge  # sorted by encoder length
    victim = sched.running[-1]
    sched._preempt(victim)  # (as a step out of blocks would)
    assert sched.waiting[0] is victim and sched.admits_next_step()  # a preempted request goes first
    assert sched.schedule().encode == [victim]
    sched.waiting.remove(huge)
    sched.waiting.insert(0, huge)  # first in line, and it never fits
    assert not sched.admits_next_step()  # paused: 8 free, the headroom
    sched.finish(sched.running[0])
    sched.finish(sched.running[0])  # 16 free, headroom 6: not paused; the next schedule fails it
    assert sched.admits_next_step()
    plan = sched.schedule()
    assert plan.failed and plan.failed[0][0] is huge
