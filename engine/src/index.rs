//! The index: RocksDB, one column family per concern.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `series` | series id (u32 BE) | canonical series key |
//! | `postings` | `measurement` → all its series; `measurement, tag, value` → series with that tag value | Roaring bitmap, maintained with a union merge operator |
//! | `segments` | segment id (u64 BE) | [`SegmentMeta`] |
//! | `catalog` | measurement | [`TableSchema`] as JSON |
//! | `meta` | name | u64 BE (`next_series_id`, `next_segment_id`, `wal_checkpoint`) |
//! | `entries` | a caller's key (`cq/…`) | a caller's bytes: run-time catalog entries of the layers above (continuous queries and their watermarks), which the engine stores and never reads |
//!
//! Everything a flush or a compaction changes (new series, postings, segments added and
//! removed, the WAL checkpoint) goes into one [`IndexBatch`] written with `sync`, so a
//! segment becomes visible, with its series, atomically or not at all.
//!
//! A read of a posting list merges every operand RocksDB holds for it in the memtable, so
//! operands are kept few: a batch writes one union per posting list, not one per new series,
//! and a commit that changed postings flushes their memtable, whose operands the flush folds
//! together. (Before, a server that had registered TSBS's 1,000 hosts merged 1,000 one-series
//! bitmaps for `cpu` on every query that asked for a measurement's series, until restarted:
//! a fifth of a one-host query's time.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use croaring::{Bitmap, Portable};
use rocksdb::{ColumnFamilyDescriptor, DB, MergeOperands, Options, WriteBatch, WriteOptions};

use crate::catalog::TableSchema;
use crate::disk::DiskGuard;
use crate::segment::SegmentMeta;
use crate::{Error, Result, SeriesId};

const CF_SERIES: &str = "series";
const CF_POSTINGS: &str = "postings";
const CF_SEGMENTS: &str = "segments";
const CF_CATALOG: &str = "catalog";
const CF_META: &str = "meta";
const CF_ENTRIES: &str = "entries";
const FAMILIES: [&str; 6] = [
    CF_SERIES,
    CF_POSTINGS,
    CF_SEGMENTS,
    CF_CATALOG,
    CF_META,
    CF_ENTRIES,
];

const META_NEXT_SERIES: &[u8] = b"next_series_id";
const META_NEXT_SEGMENT: &[u8] = b"next_segment_id";
const META_WAL_CHECKPOINT: &[u8] = b"wal_checkpoint";
/// Prefix of the keys holding each measurement's last rows.
const META_LAST_ROWS: &[u8] = b"last_rows/";

fn last_rows_key(measurement: &str) -> Vec<u8> {
    let mut k = META_LAST_ROWS.to_vec();
    k.extend_from_slice(measurement.as_bytes());
    k
}

/// One column family's memtable.
const INDEX_MEMTABLE_BYTES: usize = 4 << 20;

/// The RocksDB index of one store.
#[derive(Debug)]
pub struct Index {
    db: DB,
    path: PathBuf,
    /// Refuses writes while the disk is nearly full ([`Index::guarded_by`]).
    guard: DiskGuard,
}

/// Changes applied together by [`Index::commit`].
#[derive(Default)]
pub struct IndexBatch {
    batch: WriteBatch,
    /// Series added to each posting list (by key), written as one merge each at commit.
    postings: BTreeMap<Vec<u8>, Bitmap>,
}

impl std::fmt::Debug for IndexBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexBatch")
            .field("ops", &self.batch.len())
            .field("postings", &self.postings.len())
            .finish()
    }
}

fn union_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut acc = match existing {
        // A value that does not decode is dropped rather than failing every later read;
        // RocksDB has no way to report an error from a merge operator.
        Some(bytes) => Bitmap::try_deserialize::<Portable>(bytes).unwrap_or_default(),
        None => Bitmap::new(),
    };
    for op in operands {
        if let Some(b) = Bitmap::try_deserialize::<Portable>(op) {
            acc.or_inplace(&b);
        }
    }
    acc.run_optimize();
    Some(acc.serialize::<Portable>())
}

/// Key of a posting list: length-prefixed parts, so no name needs a reserved byte.
fn posting_key(measurement: &str, tag: Option<(&str, &str)>) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    push_part(&mut key, measurement.as_bytes());
    if let Some((k, v)) = tag {
        push_part(&mut key, k.as_bytes());
        key.extend_from_slice(v.as_bytes());
    }
    key
}

fn push_part(key: &mut Vec<u8>, part: &[u8]) {
    key.extend_from_slice(&(part.len() as u32).to_be_bytes());
    key.extend_from_slice(part);
}

fn decode_bitmap(bytes: &[u8]) -> Result<Bitmap> {
    Bitmap::try_deserialize::<Portable>(bytes).ok_or_else(|| Error::DecodeIndex {
        what: "posting list",
        reason: "not a portable Roaring bitmap".into(),
    })
}

fn be_u64(bytes: &[u8], what: &'static str) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| Error::DecodeIndex {
        what,
        reason: format!("{} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

impl Index {
    /// Opens (or creates) the index at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The index is small (TSBS's 1,000 hosts and a day of segments are 2 MB compacted),
        // but RocksDB's defaults are for a database: a 64 MiB memtable per family (and WAL
        // files preallocated to match), and info logs without bound. See also `commit`.
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(1 << 20);
        let family = || {
            let mut o = Options::default();
            o.set_write_buffer_size(INDEX_MEMTABLE_BYTES);
            o
        };
        let mut postings = family();
        postings.set_merge_operator_associative("roaring_union", union_merge);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_SERIES, family()),
            ColumnFamilyDescriptor::new(CF_POSTINGS, postings),
            ColumnFamilyDescriptor::new(CF_SEGMENTS, family()),
            ColumnFamilyDescriptor::new(CF_CATALOG, family()),
            ColumnFamilyDescriptor::new(CF_META, family()),
            ColumnFamilyDescriptor::new(CF_ENTRIES, family()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| Error::OpenIndex {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
            guard: DiskGuard::off(),
        })
    }

    /// The same index, refusing writes while `guard` does (see [`crate::disk`]).
    pub fn guarded_by(mut self, guard: DiskGuard) -> Self {
        self.guard = guard;
        self
    }

    /// Where the index lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        // Every family is created by `open` (create_missing_column_families).
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn sync_write(&self, batch: WriteBatch, op: &'static str) -> Result<()> {
        self.guard.check()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|source| Error::Index { op, source })
    }

    /// Writes a batch durably.
    pub fn commit(&self, batch: IndexBatch) -> Result<()> {
        let IndexBatch {
            mut batch,
            postings,
        } = batch;
        let cf = self.cf(CF_POSTINGS);
        for (key, series) in &postings {
            batch.merge_cf(cf, key, series.serialize::<Portable>());
        }
        self.sync_write(batch, "commit")?;
        // The batch is durable; what follows keeps the index small and its reads fast, so a
        // failure here is not the commit's. Every family's memtable is flushed (an empty one
        // costs nothing): a read of a posting list merges every operand in the memtable, and
        // RocksDB keeps a WAL file until every family that wrote to it has flushed, so
        // `meta`, which takes the last rows at each flush and filled its memtable slowly,
        // kept 70 MB of WAL during a TSBS load. This runs right after a write the disk guard
        // let through: RocksDB flushing on its own (past a WAL size limit, say) could meet a
        // full disk, and a failed WAL write aborts Debian's RocksDB 7.8 at the next sync.
        for name in FAMILIES {
            if let Err(e) = self.db.flush_cf(self.cf(name)) {
                tracing::warn!(family = name, error = %e, "could not flush an index memtable");
            }
        }
        Ok(())
    }

    /// Stores a schema durably.
    pub fn put_schema(&self, schema: &TableSchema) -> Result<()> {
        let json = serde_json::to_vec(schema).map_err(|e| Error::DecodeIndex {
            what: "schema",
            reason: e.to_string(),
        })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CATALOG), schema.name.as_bytes(), json);
        self.sync_write(batch, "put schema")
    }

    /// Applies `changes` (a value to put, or `None` to delete) to the entries atomically and
    /// durably: they are all on disk, or none is, when this returns.
    pub fn put_entries(&self, changes: &[(String, Option<Vec<u8>>)]) -> Result<()> {
        let cf = self.cf(CF_ENTRIES);
        let mut batch = WriteBatch::default();
        for (key, value) in changes {
            match value {
                Some(v) => batch.put_cf(cf, key.as_bytes(), v),
                None => batch.delete_cf(cf, key.as_bytes()),
            }
        }
        self.sync_write(batch, "put entries")
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn entries(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_ENTRIES),
            rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|source| Error::Index {
                op: "read entries",
                source,
            })?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8(k.to_vec()).map_err(|e| Error::DecodeIndex {
                what: "entry key",
                reason: e.to_string(),
            })?;
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    /// Every stored schema.
    pub fn load_schemas(&self) -> Result<Vec<TableSchema>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CATALOG), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item.map_err(|source| Error::Index {
                op: "read catalog",
                source,
            })?;
            out.push(serde_json::from_slice(&v).map_err(|e| Error::DecodeIndex {
                what: "schema",
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Every series, as (id, canonical key).
    pub fn load_series(&self) -> Result<Vec<(SeriesId, String)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SERIES), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|source| Error::Index {
                op: "read series",
                source,
            })?;
            let id: [u8; 4] = k.as_ref().try_into().map_err(|_| Error::DecodeIndex {
                what: "series id",
                reason: format!("{} bytes, expected 4", k.len()),
            })?;
            let key = String::from_utf8(v.to_vec()).map_err(|e| Error::DecodeIndex {
                what: "series key",
                reason: e.to_string(),
            })?;
            out.push((u32::from_be_bytes(id), key));
        }
        Ok(out)
    }

    /// Every segment in the manifest, by id.
    pub fn load_segments(&self) -> Result<Vec<SegmentMeta>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SEGMENTS), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item.map_err(|source| Error::Index {
                op: "read manifest",
                source,
            })?;
            out.push(SegmentMeta::decode(&v)?);
        }
        Ok(out)
    }

    fn meta(&self, key: &[u8]) -> Result<u64> {
        match self
            .db
            .get_cf(self.cf(CF_META), key)
            .map_err(|source| Error::Index {
                op: "read meta",
                source,
            })? {
            Some(v) => be_u64(&v, "meta counter"),
            None => Ok(0),
        }
    }

    /// The next unused series id.
    pub fn next_series_id(&self) -> Result<SeriesId> {
        Ok(u32::try_from(self.meta(META_NEXT_SERIES)?).unwrap_or(u32::MAX))
    }

    /// The next unused segment id.
    pub fn next_segment_id(&self) -> Result<u64> {
        Ok(self.meta(META_NEXT_SEGMENT)?.max(1))
    }

    /// The first WAL file not covered by durable segments.
    pub fn wal_checkpoint(&self) -> Result<u64> {
        self.meta(META_WAL_CHECKPOINT)
    }

    /// The posting list of one tag value.
    pub fn posting(&self, measurement: &str, tag: &str, value: &str) -> Result<Bitmap> {
        self.get_bitmap(&posting_key(measurement, Some((tag, value))))
    }

    /// Every series of a measurement.
    pub fn measurement_series(&self, measurement: &str) -> Result<Bitmap> {
        self.get_bitmap(&posting_key(measurement, None))
    }

    fn get_bitmap(&self, key: &[u8]) -> Result<Bitmap> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_POSTINGS), key)
            .map_err(|source| Error::Index {
                op: "read posting list",
                source,
            })? {
            Some(v) => decode_bitmap(&v),
            None => Ok(Bitmap::new()),
        }
    }

    /// Every value of one tag with its posting list, for regex and negated predicates.
    pub fn tag_values(&self, measurement: &str, tag: &str) -> Result<Vec<(String, Bitmap)>> {
        let mut prefix = Vec::new();
        push_part(&mut prefix, measurement.as_bytes());
        push_part(&mut prefix, tag.as_bytes());
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_POSTINGS),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|source| Error::Index {
                op: "scan posting lists",
                source,
            })?;
            if !k.starts_with(&prefix) {
                break;
            }
            let value = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((value, decode_bitmap(&v)?));
        }
        Ok(out)
    }

    /// A new, empty batch.
    pub fn batch(&self) -> IndexBatch {
        IndexBatch::default()
    }

    /// Records a new series with its postings.
    pub fn add_series(
        &self,
        b: &mut IndexBatch,
        id: SeriesId,
        key: &str,
        measurement: &str,
        tags: &[(String, String)],
    ) {
        b.batch
            .put_cf(self.cf(CF_SERIES), id.to_be_bytes(), key.as_bytes());
        let keys = std::iter::once(posting_key(measurement, None)).chain(
            tags.iter()
                .map(|(k, v)| posting_key(measurement, Some((k, v)))),
        );
        for key in keys {
            b.postings.entry(key).or_default().add(id);
        }
    }

    /// Sets the next series id.
    pub fn set_next_series_id(&self, b: &mut IndexBatch, next: SeriesId) {
        b.batch.put_cf(
            self.cf(CF_META),
            META_NEXT_SERIES,
            u64::from(next).to_be_bytes(),
        );
    }

    /// Sets the next segment id.
    pub fn set_next_segment_id(&self, b: &mut IndexBatch, next: u64) {
        b.batch
            .put_cf(self.cf(CF_META), META_NEXT_SEGMENT, next.to_be_bytes());
    }

    /// Records that WAL files before `file` are covered by durable segments.
    pub fn set_wal_checkpoint(&self, b: &mut IndexBatch, file: u64) {
        b.batch
            .put_cf(self.cf(CF_META), META_WAL_CHECKPOINT, file.to_be_bytes());
    }

    /// Stores the last rows of `measurement` (Arrow IPC, see `last.rs`).
    pub fn set_last_rows(&self, b: &mut IndexBatch, measurement: &str, ipc: &[u8]) {
        b.batch
            .put_cf(self.cf(CF_META), last_rows_key(measurement), ipc);
    }

    /// Every measurement's stored last rows.
    pub fn load_last_rows(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_META),
            rocksdb::IteratorMode::From(META_LAST_ROWS, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|source| Error::Index {
                op: "read last rows",
                source,
            })?;
            let Some(name) = k.strip_prefix(META_LAST_ROWS) else {
                break;
            };
            out.push((String::from_utf8_lossy(name).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Adds a segment to the manifest.
    pub fn add_segment(&self, b: &mut IndexBatch, meta: &SegmentMeta) {
        b.batch
            .put_cf(self.cf(CF_SEGMENTS), meta.id.to_be_bytes(), meta.encode());
    }

    /// Removes a segment from the manifest.
    pub fn remove_segment(&self, b: &mut IndexBatch, id: u64) {
        b.batch.delete_cf(self.cf(CF_SEGMENTS), id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postings_merge_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = Index::open(dir.path()).unwrap();
            let mut b = index.batch();
            index.add_series(
                &mut b,
                1,
                "cpu,host=a",
                "cpu",
                &[("host".into(), "a".into())],
            );
            index.add_series(
                &mut b,
                2,
                "cpu,host=b",
                "cpu",
                &[("host".into(), "b".into())],
            );
            index.set_next_series_id(&mut b, 3);
            index.commit(b).unwrap();
            let mut b = index.batch();
            index.add_series(
                &mut b,
                7,
                "cpu,host=a,x=y",
                "cpu",
                &[("host".into(), "a".into()), ("x".into(), "y".into())],
            );
            index.commit(b).unwrap();
        }
        let index = Index::open(dir.path()).unwrap();
        assert_eq!(
            index.posting("cpu", "host", "a").unwrap().to_vec(),
            vec![1, 7]
        );
        assert_eq!(index.posting("cpu", "host", "b").unwrap().to_vec(), vec![2]);
        assert!(index.posting("cpu", "host", "c").unwrap().is_empty());
        assert_eq!(
            index.measurement_series("cpu").unwrap().to_vec(),
            vec![1, 2, 7]
        );
        assert!(index.measurement_series("mem").unwrap().is_empty());
        let values = index.tag_values("cpu", "host").unwrap();
        assert_eq!(
            values
                .iter()
                .map(|(v, b)| (v.as_str(), b.to_vec()))
                .collect::<Vec<_>>(),
            vec![("a", vec![1, 7]), ("b", vec![2])]
        );
        // "ho" is a prefix of "host" but a different tag: the length prefix keeps them apart.
        assert!(index.tag_values("cpu", "ho").unwrap().is_empty());
        assert_eq!(index.next_series_id().unwrap(), 3);
        let series = index.load_series().unwrap();
        assert_eq!(series.len(), 3);
        assert_eq!(series[2], (7, "cpu,host=a,x=y".to_string()));
    }

    /// Reads merge every operand a posting list has in the memtable: a batch of many new
    /// series writes one per list, and the commit leaves none in the memtable.
    #[test]
    fn new_series_leave_few_posting_operands_to_merge() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        for round in 0..3u32 {
            let mut b = index.batch();
            for i in 0..1000 {
                let id = round * 1000 + i;
                let host = format!("h{id}");
                let tags = [("host".to_string(), host), ("dc".to_string(), "x".into())];
                index.add_series(&mut b, id, &format!("cpu,id={id}"), "cpu", &tags);
            }
            assert_eq!(b.postings.len(), 1002, "cpu, dc=x and 1,000 hosts");
            index.commit(b).unwrap();
            let in_memtable = index
                .db
                .property_int_value_cf(
                    index.cf(CF_POSTINGS),
                    "rocksdb.num-entries-active-mem-table",
                )
                .unwrap();
            assert_eq!(in_memtable, Some(0));
        }
        assert_eq!(index.measurement_series("cpu").unwrap().cardinality(), 3000);
        assert_eq!(index.posting("cpu", "dc", "x").unwrap().cardinality(), 3000);
        assert_eq!(
            index.posting("cpu", "host", "h2999").unwrap().to_vec(),
            vec![2999]
        );
    }
}
