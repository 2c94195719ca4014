"""FleetStrategy: a Flower strategy wrapper that makes any inner strategy (FedAvg, or FedAvg
inside Flower's DP wrapper) a PEFT-adapter fleet.

Around the inner strategy it:
- signs what it sends (the fleet adapter version, for this bundle) and names the bundle;
- refuses replies from another bundle (manifest sha256) or with other tensors (names,
  shapes, non-finite values), and decodes int8 deltas against what it sent;
- measures bytes per device per round (down and up: the arrays' payloads) and, for LoRA with
  both factors trainable, the gap of averaging A and B apart (``edgepeft.fleet.lora``);
- publishes each new fleet adapter, signed (``edgepeft.fleet.signed``), and keeps the previous
  one when a round yields nothing usable (all replies failed or refused, or a non-finite
  aggregate): the fleet adapter is never replaced by a broken one;
- reports, per round, the privacy spent (the DP wrapper's RDP accountant) and the evaluation.

The inner strategy does the averaging (weighted by ``num-examples``, or uniformly for DP)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from edgepeft.manifest import Manifest

from edgepeft.fleet import lora, signed
from edgepeft.fleet.errors import FleetError
from edgepeft.fleet.wire import (Tensors, check_tensors, decode_int8_delta, from_record, is_int8_delta,
                                 record_bytes, to_record)


class FleetStrategy(Strategy):
    def __init__(self, inner: Strategy, *, manifest: Manifest, bundle_sha: str, publish_dir: str | Path,
                 key=None):
        self.inner = inner
        self.manifest = manifest
        self.bundle_sha = bundle_sha
        self.publish_dir = Path(publish_dir)
        self.key = key
        self.version = 0                     # the fleet adapter version devices get (0: the bundle's initial)
        self.history: list[dict[str, Any]] = []
        self._sent: Tensors = {}
        self._pairs = [] if lora.a_is_frozen(manifest) else lora.lora_pairs(manifest)
        self._t0 = time.perf_counter()

    # -- what goes out --------------------------------------------------------------------------
    def _stamp(self, arrays: ArrayRecord, config: ConfigRecord) -> ConfigRecord:
        tensors = from_record(arrays)
        if not self.history and not (self.publish_dir / "round-0000").exists():
            signed.publish(self.publish_dir, tensors, self.bundle_sha, 0, self.key)
        cfg = ConfigRecord(dict(config))
        cfg["bundle-sha256"] = self.bundle_sha
        cfg["fleet-version"] = self.version
        if self.key is not None:
            cfg["fleet-signature"] = signed.sign(tensors, self.bundle_sha, self.version, self.key)
        return cfg

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = from_record(arrays)
        msgs = list(self.inner.configure_train(server_round, arrays, self._stamp(arrays, config), grid))
        self._row(server_round)["bytes_down_per_device"] = record_bytes(arrays)
        self._row(server_round)["sampled"] = len(msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, self._stamp(arrays, config), grid)

    # -- what comes back ------------------------------------------------------------------------
    def _screen(self, msg: Message) -> Tensors:
        """The reply's tensors (decoded), or FleetError saying why it is refused."""
        fleet = msg.content.config_records.get("fleet")
        theirs = str(fleet.get("bundle-sha256", "")) if fleet is not None else ""
        if theirs != self.bundle_sha:
            raise FleetError(f"reply from node {msg.metadata.src_node_id} is for bundle {theirs[:12] or '?'}, "
                             f"the fleet runs {self.bundle_sha[:12]}")
        tensors = from_record(next(iter(msg.content.array_records.values())))
        if is_int8_delta(tensors):
            tensors = decode_int8_delta(tensors, self._sent)
        return check_tensors(tensors, self.manifest, f"reply from node {msg.metadata.src_node_id}")

    def _clean(self, msg: Message, tensors: Tensors) -> Message:
        """The reply as the inner strategy expects it: one ArrayRecord (decoded), one MetricRecord."""
        metrics = next(iter(msg.content.metric_records.values()))
        msg.content = RecordDict({"arrays": to_record(tensors), "metrics": metrics})
        return msg

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        row, good, updates, weights = self._row(server_round), [], [], []
        row.update(failures=0, refused=[], bytes_up_per_device=[], train_per_device=[])
        for msg in replies:
            if msg.has_error():
                row["failures"] += 1
                continue
            row["bytes_up_per_device"].append(record_bytes(next(iter(msg.content.array_records.values()))))
            try:
                tensors = self._screen(msg)
            except FleetError as e:
                row["refused"].append(str(e))
                continue
            m = next(iter(msg.content.metric_records.values()))
            row["train_per_device"].append(dict(m))
            updates.append(tensors)
            weights.append(float(m["num-examples"]))
            good.append(self._clean(msg, tensors))
        row["replies"] = len(good)
        if self._pairs and updates:
            row["lora_product_gap"] = lora.product_gap(updates, weights, self._pairs)
        arrays, metrics = self.inner.aggregate_train(server_round, good) if good else (None, None)
        arrays = self._accept_aggregate(server_round, arrays, row)
        spent = getattr(self.inner, "privacy_spent", lambda: None)()
        if spent is not None:
            row.update(epsilon=spent.epsilon, delta=spent.delta)
        eps = [m["dp-epsilon"] for m in row["train_per_device"] if "dp-epsilon" in m]
        if eps and spent is None:  # sample-level DP: each device's own accountant (fleet.privacy)
            row.update(epsilon=max(eps), delta=row["train_per_device"][0]["dp-delta"], epsilon_per_device=eps)
        if metrics is not None:
            row["train"] = dict(metrics)
        return arrays, metrics

    def _accept_aggregate(self, server_round: int, arrays: ArrayRecord | None, row: dict) -> ArrayRecord | None:
        """Publish a usable aggregate as the new version; otherwise keep the current one."""
        if arrays is None:
            row["kept_previous"] = "no usable replies"
            return None
        try:
            tensors = check_tensors(from_record(arrays), self.manifest, "the aggregate")
        except FleetError as e:
            row["kept_previous"] = str(e)
            return None
        self.version = server_round
        row["published"] = str(signed.publish(self.publish_dir, tensors, self.bundle_sha, server_round, self.key))
        row["version"] = server_round
        return to_record(tensors)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        per_device = [dict(next(iter(m.content.metric_records.values()))) for m in replies if not m.has_error()]
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        row = self._row(server_round)
        row["evaluate"] = dict(metrics) if metrics is not None else None
        row["evaluate_per_device"] = per_device
        row["seconds"] = round(time.perf_counter() - self._t0, 2)
        return metrics

    def summary(self) -> None:
        self.inner.summary()

    def _row(self, server_round: int) -> dict[str, Any]:
        if not self.history or self.history[-1]["round"] != server_round:
            self.history.append({"round": server_round})
        return self.history[-1]
