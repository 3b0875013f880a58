//! Human-readable sizes and counts for reports.

/// `812 B`, `12.3 KB`, `4.56 MB`, `1.73 GB` (powers of 1000).
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n < 1e3 => format!("{n:.0} B"),
        n if n < 1e6 => format!("{:.1} KB", n / 1e3),
        n if n < 1e9 => format!("{:.2} MB", n / 1e6),
        n => format!("{:.2} GB", n / 1e9),
    }
}

/// `512`, `193.2K`, `4.02B`.
pub fn count(n: u64) -> String {
    let x = n as f64;
    match x {
        x if x < 1e4 => n.to_string(),
        x if x < 1e6 => format!("{:.1}K", x / 1e3),
        x if x < 1e9 => format!("{:.2}M", x / 1e6),
        x => format!("{:.2}B", x / 1e9),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_and_counts_pick_their_unit() {
        assert_eq!(super::bytes(812), "812 B");
        assert_eq!(super::bytes(12_345), "12.3 KB");
        assert_eq!(super::bytes(1_728_000_000), "1.73 GB");
        assert_eq!(super::count(512), "512");
        assert_eq!(super::count(193_216), "193.2K");
        assert_eq!(super::count(4_022_468_096), "4.02B");
    }
}
