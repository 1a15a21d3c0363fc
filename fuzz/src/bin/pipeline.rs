//! AFL++ entry point: `cargo afl fuzz ... target/release/pipeline` (see fuzz/smoke.sh).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        dnstap_analyser_fuzz::pipeline::check(data);
    });
}
