//! The HTTP/1 framing watch: any byte stream, cut into reads of any sizes,
//! gives the same verdict (which request head first carried both
//! Content-Length and Transfer-Encoding) as the whole stream fed at once,
//! and never panics. And it agrees with the parser hyper uses (httparse):
//! a first head httparse reads whole carries both framing headers exactly
//! when the watch says head 0 did (a miss would be a smuggled request, a
//! false alarm a refused good one).
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

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if let Ok(httparse::Status::Complete(_)) = req.parse(stream) {
        let has = |n: &str| req.headers.iter().any(|h| h.name.eq_ignore_ascii_case(n));
        let both = has("content-length") && has("transfer-encoding");
        assert_eq!(
            whole == Some(0),
            both,
            "the watch and httparse disagree on the first head"
        );
    }
});
