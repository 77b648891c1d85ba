//! Header maps as the proxy-wasm ABI passes them whole: one call reads every
//! request header instead of a host call per header (each call into Envoy
//! costs about a microsecond). Changes go back header by header: replacing
//! the whole map makes Envoy remove and re-add every header, which costs
//! more than the few edits a request needs.
//!
//! Encoding: u32 count, then a (u32 name length, u32 value length) pair per
//! header, then each name and value followed by a NUL byte; little-endian.

/// A header as bytes: clients may send values that are not UTF-8.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// Decodes a serialized header map; None if the bytes are not one.
pub fn decode(bytes: &[u8]) -> Option<Vec<Header<'_>>> {
    let count = read_u32(bytes, 0)? as usize;
    let sizes_end = 4usize.checked_add(count.checked_mul(8)?)?;
    if sizes_end > bytes.len() {
        return None;
    }
    let mut headers = Vec::with_capacity(count);
    let mut data = sizes_end;
    for i in 0..count {
        let name_len = read_u32(bytes, 4 + i * 8)? as usize;
        let value_len = read_u32(bytes, 8 + i * 8)? as usize;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data += name_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data += value_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        headers.push((name, value));
    }
    Some(headers)
}

/// Encodes headers for the host.
pub fn encode(headers: &[Header<'_>]) -> Vec<u8> {
    let size = 4 + headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    bytes.extend_from_slice(&len(headers.len()));
    for (name, value) in headers {
        bytes.extend_from_slice(&len(name.len()));
        bytes.extend_from_slice(&len(value.len()));
    }
    for (name, value) in headers {
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    bytes
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Every value of a header (names from Envoy are lower-case).
pub fn values<'a, 'h>(
    headers: &'h [Header<'a>],
    name: &'h str,
) -> impl Iterator<Item = &'a [u8]> + 'h {
    headers
        .iter()
        .filter(move |(n, _)| *n == name.as_bytes())
        .map(|(_, v)| *v)
}

/// The value of a header sent once; None if absent.
pub fn first<'a>(headers: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    values(headers, name).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let headers: Vec<Header> = vec![
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b"x-empty", b""),
            (b"x-bytes", b"\xff\x00\xfe"),
        ];
        let bytes = encode(&headers);
        assert_eq!(decode(&bytes).unwrap(), headers);
    }

    #[test]
    fn matches_the_abi_layout() {
        let bytes = encode(&[(b"a", b"bc")]);
        assert_eq!(bytes, b"\x01\0\0\0\x01\0\0\0\x02\0\0\0a\0bc\0");
        assert_eq!(decode(b"\0\0\0\0").unwrap(), vec![]);
    }

    #[test]
    fn refuses_malformed_maps() {
        let good = encode(&[(b"name", b"value")]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut no_nul = good.clone();
        *no_nul.last_mut().unwrap() = b'x';
        assert!(decode(&no_nul).is_none());
        assert!(decode(b"\xff\xff\xff\xff").is_none());
        assert!(decode(b"\x01\0\0\0\xff\xff\xff\xff\0\0\0\0").is_none());
    }

    #[test]
    fn lookups() {
        let headers: Vec<Header> = vec![(b"a", b"1"), (b"b", b"2"), (b"a", b"3")];
        assert_eq!(first(&headers, "a"), Some(&b"1"[..]));
        assert_eq!(
            values(&headers, "a").collect::<Vec<_>>(),
            vec![&b"1"[..], b"3"]
        );
        assert_eq!(first(&headers, "c"), None);
    }
}
