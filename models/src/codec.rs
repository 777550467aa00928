//! The byte format of model checkpoints: exact, versioned and checked.
//!
//! A checkpoint is `magic (4 bytes) · version (u32) · payload · FNV-1a 64 of the payload`.
//! Floats are stored as their IEEE bits, so a restored model continues bit for bit where it
//! stopped. A truncated, corrupted or foreign checkpoint is refused with a clear error, never
//! half-read.

use crate::{Error, Result};

/// Builds a checkpoint payload.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }

    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    pub fn opt_f64(&mut self, v: Option<f64>) {
        match v {
            Some(v) => {
                self.buf.push(1);
                self.f64(v);
            }
            None => self.buf.push(0),
        }
    }

    pub fn f64s<'a>(&mut self, v: impl ExactSizeIterator<Item = &'a f64>) {
        self.usize(v.len());
        for x in v {
            self.f64(*x);
        }
    }

    /// A length-prefixed byte string (a nested checkpoint).
    pub fn bytes(&mut self, v: &[u8]) {
        self.usize(v.len());
        self.buf.extend_from_slice(v);
    }

    /// Seals the payload: magic, version, payload and checksum.
    pub fn finish(self, magic: [u8; 4], version: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 16);
        out.extend_from_slice(&magic);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&self.buf);
        out.extend_from_slice(&fnv1a(&self.buf).to_le_bytes());
        out
    }
}

/// Reads a checkpoint payload written by [`Writer`].
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks magic, version and checksum, and returns a reader over the payload.
    pub fn open(bytes: &'a [u8], magic: [u8; 4], version: u32) -> Result<Self> {
        if bytes.len() < 16 {
            return Err(corrupt(format!("{} bytes is too short", bytes.len())));
        }
        if bytes[..4] != magic {
            return Err(corrupt("not a checkpoint of this model kind".into()));
        }
        let found = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if found != version {
            return Err(corrupt(format!(
                "format version {found}, this build reads {version}"
            )));
        }
        let (payload, sum) = bytes[8..].split_at(bytes.len() - 16);
        let mut s = [0u8; 8];
        s.copy_from_slice(sum);
        if fnv1a(payload) != u64::from_le_bytes(s) {
            return Err(corrupt("checksum mismatch (truncated or corrupted)".into()));
        }
        Ok(Self { buf: payload })
    }

    pub fn u64(&mut self) -> Result<u64> {
        let Some((head, rest)) = self.buf.split_first_chunk::<8>() else {
            return Err(corrupt("payload ends early".into()));
        };
        self.buf = rest;
        Ok(u64::from_le_bytes(*head))
    }

    /// A length or count, refused when larger than `max` (so a hostile checkpoint cannot make
    /// us allocate without bound).
    pub fn usize(&mut self, max: usize) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= max)
            .ok_or_else(|| corrupt(format!("count {v} exceeds {max}")))
    }

    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }

    pub fn opt_f64(&mut self) -> Result<Option<f64>> {
        let Some((&flag, rest)) = self.buf.split_first() else {
            return Err(corrupt("payload ends early".into()));
        };
        self.buf = rest;
        match flag {
            0 => Ok(None),
            1 => self.f64().map(Some),
            other => Err(corrupt(format!("bad option flag {other}"))),
        }
    }

    pub fn f64s(&mut self, max: usize) -> Result<Vec<f64>> {
        let n = self.usize(max)?;
        (0..n).map(|_| self.f64()).collect()
    }

    /// A byte string written by [`Writer::bytes`], refused when longer than `max`.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.usize(max)?;
        if self.buf.len() < n {
            return Err(corrupt("payload ends early".into()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Fails unless the whole payload was read.
    pub fn end(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

fn corrupt(reason: String) -> Error {
    Error::Checkpoint { reason }
}

/// FNV-1a, 64 bits: enough to catch truncation and bit rot in a checkpoint.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
