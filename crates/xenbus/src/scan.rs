//! How Linux's backends read what a frontend writes: `xenbus_scanf` with
//! `%u` or `%63s`, and `xenbus_read_unsigned` (a default where `%u` converts
//! nothing). The rules of the kernel's `vsscanf` (`lib/vsprintf.c`) are
//! written once here, for the framework and every device type, so that a
//! value Linux accepts is accepted alike (docs/backend.md has the table).
//!
//! To Linux a node's value is a C string: it ends at the first NUL.

/// The value as the kernel's `vsscanf` sees it: up to the first NUL.
fn c_string(value: &[u8]) -> &[u8] {
    value.iter().position(|&b| b == 0).map_or(value, |n| &value[..n])
}

/// The kernel's `isspace` (`lib/ctype.c`, Latin-1): space, `\t` to `\r`,
/// and the no-break space 0xA0.
fn is_kernel_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t'..=b'\r' | 0xA0)
}

fn skip_spaces(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_kernel_space(b)).count();
    &s[n..]
}

/// `%u`: white space skipped, then one decimal digit at least; what
/// follows the digits is ignored (`"12junk"` is 12). `None` where the
/// kernel converts nothing (empty, `"-1"`, `"yes"`). Digits beyond 32 bits
/// wrap as the kernel's do (accumulated in 64 bits, stored in an
/// `unsigned int`).
pub fn scan_u32(value: &[u8]) -> Option<u32> {
    let s = skip_spaces(c_string(value));
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let v = s[..digits].iter().fold(0u64, |acc, &d| acc.wrapping_mul(10).wrapping_add(u64::from(d - b'0')));
    Some(v as u32)
}

/// `%<max>s`: the first word (white space skipped before it, ended by
/// white space), at most `max` bytes. `None` for an empty value (the
/// kernel converts nothing); `Some(b"")` for one of only white space (the
/// kernel converts an empty word).
pub fn scan_word(value: &[u8], max: usize) -> Option<&[u8]> {
    let s = c_string(value);
    if s.is_empty() {
        return None;
    }
    let s = skip_spaces(s);
    let len = s.iter().take_while(|&&b| !is_kernel_space(b)).count().min(max);
    Some(&s[..len])
}

/// `xenbus_read_unsigned(dir, node, default)`: the node by `%u`, or
/// `default` where it is absent or converts nothing.
pub fn read_unsigned(value: Option<&[u8]>, default: u32) -> u32 {
    value.and_then(scan_u32).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_u32_is_the_kernels_percent_u() {
        let cases: [(&[u8], Option<u32>); 14] = [
            (b"5", Some(5)),
            (b"  7", Some(7)),
            (b"\t\n\x0b\x0c\r\xa09", Some(9)),
            (b"12junk", Some(12)),
            (b"8\0garbage", Some(8)),
            (b"4294967295", Some(u32::MAX)),
            (b"4294967296", Some(0)),
            (b"", None),
            (b"   ", None),
            (b"-1", None),
            (b"+1", None),
            (b"yes", None),
            (b"\x005", None),
            (b"0x10", Some(0)),
        ];
        for (value, want) in cases {
            assert_eq!(scan_u32(value), want, "{value:?}");
        }
    }

    #[test]
    fn scan_word_is_the_kernels_percent_s() {
        assert_eq!(scan_word(b"x86_32-abi", 63), Some(&b"x86_32-abi"[..]));
        assert_eq!(scan_word(b"x86_32-abi\0garbage", 63), Some(&b"x86_32-abi"[..]));
        assert_eq!(scan_word(b"x86_32-abi trailing", 63), Some(&b"x86_32-abi"[..]));
        assert_eq!(scan_word(b"  x86_64-abi\n", 63), Some(&b"x86_64-abi"[..]));
        assert_eq!(scan_word(b"abcdef", 3), Some(&b"abc"[..]));
        assert_eq!(scan_word(b"", 63), None);
        assert_eq!(scan_word(b"\0x86_32-abi", 63), None);
        assert_eq!(scan_word(b"   ", 63), Some(&b""[..]));
    }

    #[test]
    fn read_unsigned_falls_back_to_the_default() {
        assert_eq!(read_unsigned(None, 1), 1);
        assert_eq!(read_unsigned(Some(b"yes"), 0), 0);
        assert_eq!(read_unsigned(Some(b"3"), 1), 3);
        assert_eq!(read_unsigned(Some(b"0"), 1), 0);
    }
}
