"""Dagster's local SQLite event log, writing a batch of asset events in one transaction.

Dagster batches the events that come in bulk (``DAGSTER_EVENT_BATCH_SIZE``): the
materializations of a run that covers a range of partitions, and the "planned" events written
when such a run is created. Its PostgreSQL storage writes a batch at once; its SQLite storage
has no batch write and stores each event on its own: a new engine, a connection and a commit
(with fsync) on the run's database, then the same again on the index database. On this machine
that is ~21 ms per event, and a features run over 3 splits x 64 shards writes ~400 of them
(measured: 10 s of a 19 s ``asr-assets materialize``).

:class:`BatchedSqliteEventLogStorage` is that same SQLite storage (same files, same tables and
rows, so ``dagster dev`` with the default storage reads what it wrote) whose
``store_event_batch`` writes the run-database rows of a batch in one transaction and the
index-database rows, tags and asset-key entries of its asset events in another.
:func:`asr_assets.cli._common.dagster_instance` uses it for an instance with the default local
storage, and sets ``DAGSTER_EVENT_BATCH_SIZE`` when unset.
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_result

#: events per batch write when ``DAGSTER_EVENT_BATCH_SIZE`` is unset (Dagster's default, 0,
#: writes every event on its own); 64 shards x 3 splits is one batch
DEFAULT_EVENT_BATCH_SIZE = 1000

MODULE, CLASS = __name__, "BatchedSqliteEventLogStorage"


class BatchedSqliteEventLogStorage(SqliteEventLogStorage):
    """:class:`dagster._core.storage.event_log.SqliteEventLogStorage` with a batch write:
    two transactions per batch instead of two per event. Config: ``base_dir``, as the parent.

    Events a batch may hold are Dagster's ``BATCH_WRITABLE_EVENTS`` (asset materializations,
    observations, planned and failed materializations, planned check evaluations), all of one
    run. Anything else, and batches spanning runs, are stored one event at a time as before.
    """

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # the parent's names its own class
        return cls(inst_data=inst_data, **config_value)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        events = list(events)
        if not events or len({e.run_id for e in events}) != 1 or not all(e.is_dagster_event for e in events):
            return super().store_event_batch(events)
        statements = [self.prepare_insert_event(e) for e in events]
        with self.run_connection(events[0].run_id) as conn:  # one transaction (see _connect)
            for statement in statements:
                conn.execute(statement)
        asset = [(e, s) for e, s in zip(events, statements) if e.dagster_event_type in ASSET_EVENTS]
        if asset:  # mirrored in the cross-run index, as store_event does, in one transaction
            with self.index_transaction() as conn:
                ids = []
                for _, statement in asset:
                    with db_result(conn, statement) as result:
                        ids.append(result.inserted_primary_key[0])
                self._store_asset_event_tags(conn, [e for e, _ in asset], ids)
                # the asset-key row holds the latest event of each kind: each write replaces
                # the same columns, so the last one of an asset and kind is the row's final state
                # (as dagster-postgres's batch write does for materializations)
                last = {(e.dagster_event.asset_key, e.dagster_event_type): (e, i) for (e, _), i in zip(asset, ids)}
                for event, event_id in last.values():
                    self._store_asset_event(conn, event, event_id)
        for event, statement in zip(events, statements):  # planned check evaluations: a few per run
            if event.dagster_event_type not in ASSET_EVENTS:
                self._store_index_only(event, statement)

    def _store_index_only(self, event: EventLogEntry, statement) -> None:
        """The index-database part of ``store_event`` for an event whose run row is written."""
        from dagster._core.events import ASSET_CHECK_EVENTS, EVENT_TYPE_TO_PIPELINE_RUN_STATUS

        if event.dagster_event_type in ASSET_CHECK_EVENTS:
            with self.index_connection() as conn, db_result(conn, statement) as result:
                event_id = result.inserted_primary_key[0]
            self.store_asset_check_event(event, event_id)
        elif event.dagster_event_type in EVENT_TYPE_TO_PIPELINE_RUN_STATUS:
            with self.index_connection() as conn:
                conn.execute(statement)
