"""Run the trainer's CLI on one rank of a torchrun test and record what this rank saw.

    torchrun --standalone --nproc-per-node 2 tests/rank_recorder.py RECORD_DIR STOP_AFTER \\
        TRAIN_ARGS...

Writes ``RECORD_DIR/rank<R>.json``: for every update, the digest of the weights after it, the
scalars this rank passed to the reduction over ranks with the result, and the episodes it
finished. With ``STOP_AFTER`` > 0, rank 0 sends itself SIGINT during that update (as
``interrupt_after`` does in test_checkpoint.py). Not a test module: the tests start it.
"""

import json
import os
import signal
import sys
import time

import trxl_rl.agents
from trxl_rl import train as trainer
from trxl_rl.distributed import Ranks, weights_digest


def main() -> int:
    record_dir, stop_after, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ["RANK"])
    updates, reductions, episodes, agents, times = [], [], [], [], {}

    build_agent = trxl_rl.agents.build_agent

    def recording_build_agent(*args, **kwargs):
        agents.append(build_agent(*args, **kwargs))
        return agents[-1]

    reduce_scalars = Ranks.reduce_scalars

    def recording_reduce_scalars(self, values, ops):
        out = reduce_scalars(self, values, ops)
        if "losses/policy_loss" in values:
            reductions.append({"mine": dict(values), "ops": dict(ops), "reduced": dict(out)})
        return out

    flush = trainer.EpisodeLog.flush

    def recording_flush(self):
        episodes.append({"returns": list(self.returns), "lengths": list(self.lengths),
                         "successes": list(self.defined["success"])})
        return flush(self)

    train = trainer.train

    def recording_train(cfg, on_update=None, resume=None, ranks=None):
        def on_update(update, stats):
            updates.append({"update": update, "weights": weights_digest(agents[-1]),
                            "stats": stats})
            if update == stop_after and rank == 0:
                os.kill(os.getpid(), signal.SIGINT)
        try:
            return train(cfg, on_update=on_update, resume=resume, ranks=ranks)
        finally:
            times["trained"] = time.time()  # rank 0: after its final evaluation

    trxl_rl.agents.build_agent = recording_build_agent
    Ranks.reduce_scalars = recording_reduce_scalars
    trainer.EpisodeLog.flush = recording_flush
    trainer.train = recording_train
    code = trainer.main(argv)
    times["returned"] = time.time()  # after the process group was torn down
    # torchrun stops this rank with SIGTERM once another exits with an error: write first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"updates": updates, "reductions": reductions, "episodes": episodes,
                   "times": times, "exit_code": code}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
