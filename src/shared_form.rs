//! The text form of the small values the filter keeps in shared data
//! (limit windows, cooldowns): a format line, then one number per line, so
//! that a value another build wrote is recognised and read or ignored.

/// `format` and the numbers, one per line.
pub fn encode(format: &str, numbers: &[u64]) -> Vec<u8> {
    let mut text = String::from(format);
    for number in numbers {
        text.push('\n');
        text.push_str(&number.to_string());
    }
    text.into_bytes()
}

/// The numbers after the format line, if `bytes` is in `format`; a missing
/// or malformed number ends the iteration early, which the caller reads as
/// no value.
pub fn decode<'a>(bytes: &'a [u8], format: &str) -> Option<impl Iterator<Item = Option<u64>> + 'a> {
    let mut lines = std::str::from_utf8(bytes).ok()?.split('\n');
    (lines.next()? == format).then(|| lines.map(|line| line.parse().ok()))
}
