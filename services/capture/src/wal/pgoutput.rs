//! Decoding the pgoutput messages (protocol version 1) that the replication
//! client hands over as raw bytes: Relation, Insert, Update, Delete and
//! Truncate. Begin, Commit and logical-decoding messages are framed by the
//! client (`client.rs`). Only text-format tuples are requested.

use bytes::Bytes;

/// Microseconds from the Unix epoch to Postgres's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the stream delivers, in WAL order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// A committed transaction starts; `final_lsn` is its commit record.
    Begin { final_lsn: u64, xid: u32, commit_time_us: i64 },
    /// A raw pgoutput message (Relation, Insert, Update, Delete, Truncate…).
    Change(Bytes),
    /// A `pg_logical_emit_message`.
    Message { transactional: bool, prefix: String, content: Bytes },
    /// The transaction ends; `end_lsn` is the position to confirm.
    Commit { lsn: u64, end_lsn: u64, commit_time_us: i64 },
    /// The server's position while nothing else is sent.
    KeepAlive { wal_end: u64 },
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: pgoutput does not resend it.
    Unchanged,
    Text(Bytes),
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A relation (table) description, sent before its first change in each
/// session and again after its schema changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    /// `old` is the whole old row under `REPLICA IDENTITY FULL`; an old key
    /// only ('K': the replica identity index changed) is not kept.
    Update {
        relation: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    /// `old` is the whole old row under `REPLICA IDENTITY FULL`, else `None`
    /// (the key only, not kept).
    Delete {
        relation: u32,
        old: Option<Vec<Value>>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin and anything else Herald does not need.
    Ignored(u8),
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("pgoutput {tag:?} message: {reason}")]
pub struct DecodeError {
    pub tag: char,
    pub reason: String,
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
    tag: u8,
}

impl Reader<'_> {
    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError { tag: self.tag as char, reason: reason.into() })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let Some(end) = self.at.checked_add(n).filter(|&end| end <= self.data.len()) else {
            return self.fail(format!("truncated at byte {} (wanted {n} more)", self.at));
        };
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn time_us(&mut self) -> Result<i64, DecodeError> {
        Ok((self.u64()? as i64).saturating_add(PG_EPOCH_OFFSET_US))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let Some(len) = rest.iter().position(|&b| b == 0) else { return self.fail("unterminated string") };
        let text = match std::str::from_utf8(&rest[..len]) {
            Ok(text) => text.to_string(),
            Err(_) => return self.fail("string is not UTF-8"),
        };
        self.at += len + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let columns = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(columns));
        for _ in 0..columns {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let start = self.at;
                    self.take(len)?;
                    Value::Text(self.data.slice(start..start + len))
                }
                other => return self.fail(format!("column kind {:?} (only text tuples are requested)", other as char)),
            });
        }
        Ok(values)
    }

    /// An old image ('O' kept, 'K' skipped) if one comes next, then the
    /// new tuple ('N').
    fn old_and_new(&mut self) -> Result<(Option<Vec<Value>>, Vec<Value>), DecodeError> {
        let mut kind = self.u8()?;
        let mut old = None;
        if kind == b'K' || kind == b'O' {
            let tuple = self.tuple()?;
            old = (kind == b'O').then_some(tuple);
            kind = self.u8()?;
        }
        if kind != b'N' {
            return self.fail(format!("expected a new tuple, found {:?}", kind as char));
        }
        Ok((old, self.tuple()?))
    }

    /// A deleted row's old image: 'O' kept, 'K' skipped.
    fn old(&mut self) -> Result<Option<Vec<Value>>, DecodeError> {
        match self.u8()? {
            b'O' => Ok(Some(self.tuple()?)),
            b'K' => self.tuple().map(|_| None),
            kind => self.fail(format!("expected an old tuple, found {:?}", kind as char)),
        }
    }
}

/// Frames one whole pgoutput message as the stream would deliver it:
/// Begin, Commit and logical-decoding messages decoded, anything else raw.
/// (For `pg_logical_slot_get_binary_changes`, which returns them all raw.)
pub fn frame(data: Bytes) -> Result<WalMessage, DecodeError> {
    let Some(&tag) = data.first() else { return Err(DecodeError { tag: '?', reason: "empty message".into() }) };
    let mut r = Reader { data: &data, at: 1, tag };
    let message = match tag {
        b'B' => {
            let final_lsn = r.u64()?;
            let commit_time_us = r.time_us()?;
            WalMessage::Begin { final_lsn, commit_time_us, xid: r.u32()? }
        }
        b'C' => {
            let _flags = r.u8()?;
            let lsn = r.u64()?;
            let end_lsn = r.u64()?;
            WalMessage::Commit { lsn, end_lsn, commit_time_us: r.time_us()? }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let _lsn = r.u64()?;
            let prefix = r.cstring()?;
            let len = r.u32()? as usize;
            let start = r.at;
            r.take(len)?;
            WalMessage::Message { transactional, prefix, content: data.slice(start..start + len) }
        }
        _ => return Ok(WalMessage::Change(data)),
    };
    Ok(message)
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Change, DecodeError> {
    let Some(&tag) = data.first() else { return Err(DecodeError { tag: '?', reason: "empty message".into() }) };
    let mut r = Reader { data, at: 1, tag };
    let change = match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstring()?;
            let name = r.cstring()?;
            let _replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let _flags = r.u8()?;
                let name = r.cstring()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column { name, type_oid });
            }
            Change::Relation(Relation { id, schema, name, columns })
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return r.fail("expected a new tuple");
            }
            Change::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let (old, new) = r.old_and_new()?;
            Change::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32()?;
            Change::Delete { relation, old: r.old()? }
        }
        b'T' => {
            let count = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                relations.push(r.u32()?);
            }
            Change::Truncate { relations }
        }
        other => Change::Ignored(other),
    };
    Ok(change)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A tuple on the wire: `None` null, `Some("\u{0}")` an unchanged
    /// TOASTed value, else text.
    pub(in crate::wal) fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("\u{0}") => out.push(b'u'),
                Some(text) => {
                    out.push(b't');
                    out.extend((text.len() as u32).to_be_bytes());
                    out.extend(text.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn relation_insert_update_truncate() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0res_users\0d");
        rel.extend(2u16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("slug", 25)] {
            rel.push(1);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Change::Relation(r) = decode(&Bytes::from(rel)).unwrap() else { panic!() };
        assert_eq!((r.id, r.schema.as_str(), r.name.as_str(), r.columns.len()), (16384, "public", "res_users", 2));
        assert_eq!(r.columns[1], Column { name: "slug".into(), type_oid: 25 });

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("7"), None]));
        let Change::Insert { relation, new } = decode(&Bytes::from(ins)).unwrap() else { panic!() };
        assert_eq!((relation, &new[..]), (16384, &[Value::Text(Bytes::from_static(b"7")), Value::Null][..]));

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("6"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("7"), Some("alice")]));
        let Change::Update { old, new, .. } = decode(&Bytes::from(upd)).unwrap() else { panic!() };
        assert_eq!((old, &new[1]), (None, &Value::Text(Bytes::from_static(b"alice"))));

        // REPLICA IDENTITY FULL: the whole old row, kept.
        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("7"), Some("al")]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("7"), Some("alice")]));
        let Change::Update { old, .. } = decode(&Bytes::from(upd)).unwrap() else { panic!() };
        assert_eq!(old.unwrap()[1], Value::Text(Bytes::from_static(b"al")));
        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'O');
        del.extend(tuple(&[Some("7"), None]));
        let Change::Delete { old, .. } = decode(&Bytes::from(del)).unwrap() else { panic!() };
        assert_eq!(old.unwrap()[1], Value::Null);
        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("7"), None]));
        assert_eq!(decode(&Bytes::from(del)).unwrap(), Change::Delete { relation: 16384, old: None });

        let mut trunc = vec![b'T'];
        trunc.extend(2u32.to_be_bytes());
        trunc.push(0);
        trunc.extend(1u32.to_be_bytes());
        trunc.extend(2u32.to_be_bytes());
        assert_eq!(decode(&Bytes::from(trunc)).unwrap(), Change::Truncate { relations: vec![1, 2] });
    }

    #[test]
    fn truncated_and_odd_input_is_an_error_never_a_panic() {
        for bad in
            [&b""[..], b"I", b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab", b"R\0\0\0\x01public", b"U\0\0\0\x01X", b"D\0\0\0\x01N"]
        {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(decode(&Bytes::from_static(b"Yxyz")).unwrap(), Change::Ignored(b'Y'));
    }
}
