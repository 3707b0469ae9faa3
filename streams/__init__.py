"""Stream workers: events from Kafka into sharded, RocksDB-backed feature and embedding stores."""

from streams import _compiled

_compiled.install()
