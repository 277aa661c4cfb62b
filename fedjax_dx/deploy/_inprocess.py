"""The Flower apps driven in one process, without a network (tests, quick checks)."""

from __future__ import annotations

from typing import Any


class InProcessGrid:
  """A stand-in for Flower's `Grid` that hands each message straight to a `ClientApp`
  with that node's own `Context` (its node config and persistent state), as a
  SuperNode would. Only what `serve` uses: `get_node_ids` and `send_and_receive`.

  Example:
    >>> grid = InProcessGrid(app.client, [{"data-path": p} for p in paths])
    >>> state, scores = serve(grid, "test", "fedavg", rounds=2)
  """

  def __init__(self, client_app, node_configs: list[dict[str, Any]], run_config=None):
    from flwr.app import Context, RecordDict  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from flwr.supercore.task_identity import TaskIdentity
    # Messages take their run's identity from the process (set by Flower's runtime);
    # here there is no runtime, so this process is run 1 on the server's node 0.
    for field, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
      if getattr(TaskIdentity, field) is None:
        setattr(TaskIdentity, field.lstrip("_"), value)
    self.client_app = client_app
    self.node_ids = [1000 + i for i in range(len(node_configs))]
    self.contexts = {
        n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(),
                   run_config=dict(run_config or {}))
        for n, c in zip(self.node_ids, node_configs)}

  def get_node_ids(self):
    return list(self.node_ids)

  def send_and_receive(self, messages, *, timeout=None):
    del timeout
    return [self._handle(m) for m in messages]

  def _handle(self, message):
    """The app's reply, or, as a SuperNode reports a ClientApp that raised, an error
    reply naming the exception."""
    from flwr.app import Error, Message  # pylint: disable=g-import-not-at-top
    try:
      return self.client_app(message, self.contexts[message.metadata.dst_node_id])
    except Exception as e:  # pylint: disable=broad-except
      return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=message)
