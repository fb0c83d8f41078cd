//! A queued request as stored: method, path, headers and body, in a small length-prefixed binary form.

/// One request accepted into a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRequest {
    pub method: String,
    /// Path and query, as the client sent them.
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl QueuedRequest {
    /// Bytes it takes in the store (for the queue's bytes limit).
    pub fn size(&self) -> usize {
        self.method.len()
            + self.path.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + self.body.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size() + 16 + 8 * self.headers.len());
        put(&mut out, self.method.as_bytes());
        put(&mut out, self.path.as_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (k, v) in &self.headers {
            put(&mut out, k.as_bytes());
            put(&mut out, v);
        }
        put(&mut out, &self.body);
        out
    }

    pub fn decode(b: &[u8]) -> Option<QueuedRequest> {
        let mut r = Reader::new(b);
        let method = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        let path = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        let n = r.u32()? as usize;
        let mut headers = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let k = String::from_utf8(r.bytes()?.to_vec()).ok()?;
            headers.push((k, r.bytes()?.to_vec()));
        }
        let body = r.bytes()?.to_vec();
        Some(QueuedRequest { method, path, headers, body })
    }
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Reads the encodings of this crate; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let r = QueuedRequest {
            method: "POST".into(),
            path: "/orders?x=1".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec()), ("x-empty".into(), vec![])],
            body: b"{\"item\":\"book\"}".to_vec(),
        };
        let bytes = r.encode();
        assert_eq!(QueuedRequest::decode(&bytes), Some(r));
        for cut in 0..bytes.len() {
            assert_eq!(QueuedRequest::decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
