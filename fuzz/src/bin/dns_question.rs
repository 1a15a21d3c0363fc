//! AFL++ entry point: `cargo afl fuzz ... target/release/dns_question` (see fuzz/smoke.sh).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        dnstap_analyser_fuzz::dns_question::check(data);
    });
}
