//! The HTTP/1 framing watch: any byte stream, cut into reads of any sizes,
//! gives the same verdict (which request head first carried both
//! Content-Length and Transfer-Encoding) as the whole stream fed at once,
//! and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger::proxy::framing::Parser;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = {
        let mut p = Parser::default();
        p.feed(stream).conflict
    };
    let mut p = Parser::default();
    let size = usize::from(cut % 16) + 1;
    let mut first = None;
    for piece in stream.chunks(size) {
        let f = p.feed(piece);
        if first.is_none() {
            first = f.conflict;
        }
    }
    assert_eq!(first, whole, "the verdict depends on how the reads were cut");
});
