//! AFL++ entry point: `cargo afl fuzz ... target/release/dnstap_scan` (see fuzz/smoke.sh).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        dnstap_analyser_fuzz::dnstap_scan::check(data);
    });
}
