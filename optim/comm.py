"""Who this process is among the ranks that share the optimizer's work, and the all-to-all exchange of
a table's rows that DistAdam's sparse gradients use (optim/dist_adam.py)."""
import torch
import torch.distributed as dist

# Module-level, so a test can count what goes through it.
_all_to_all = dist.all_to_all_single


def world():
    """(rank, world size): (0, 1) without a process group or with a group of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange_counts(send_counts, device):
    """Every rank tells every other how many items it sends it: `send_counts[j]` items go to rank j;
    returns the list of how many come from each rank. A blocking collective (its result sizes the
    buffers of the exchange that follows); on CUDA its `.tolist()` waits for the device."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    _all_to_all(recv, send)
    return recv.tolist()


class RowExchange:
    """An async all-to-all of table rows and their row ids, started by `start_row_exchange`.

    `wait()` returns (ids, rows): int64 ids (n,) and the rows (n, width) every rank sent this one,
    ordered by the sending rank."""

    def __init__(self, works, recv_ids, recv_rows, keep):
        self.works, self.recv_ids, self.recv_rows = works, recv_ids, recv_rows
        self._keep = keep  # the send buffers, alive until the collectives finish

    def wait(self):
        for work in self.works:
            work.wait()
        self.works, self._keep = [], None
        return self.recv_ids, self.recv_rows


def start_row_exchange(ids, rows, send_counts):
    """Sends rank j the next `send_counts[j]` of `ids` (int64, (n,)) and of `rows` ((n, width)), in
    rank order; every rank calls it. The counts are exchanged first (blocking, small), then the ids and
    the rows go as two async all-to-alls."""
    recv_counts = exchange_counts(send_counts, ids.device)
    width = rows.shape[1]
    ids, rows = ids.contiguous(), rows.contiguous()
    recv_ids = torch.empty(sum(recv_counts), dtype=torch.int64, device=ids.device)
    recv_rows = torch.empty(sum(recv_counts), width, dtype=rows.dtype, device=rows.device)
    works = [
        _all_to_all(recv_ids, ids, output_split_sizes=recv_counts, input_split_sizes=send_counts, async_op=True),
        _all_to_all(recv_rows.view(-1), rows.view(-1), output_split_sizes=[c * width for c in recv_counts],
                    input_split_sizes=[c * width for c in send_counts], async_op=True),
    ]
    return RowExchange(works, recv_ids, recv_rows, (ids, rows))
