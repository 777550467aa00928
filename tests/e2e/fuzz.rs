//! Protocol fuzzing of the PostgreSQL port with proptest, against a real `forestall serve`:
//! random and mutated startup packets, and after a valid startup, sequences of frontend
//! messages (Parse, Bind, Describe, Execute, Close, Query, Sync, Flush, and bytes that are
//! no message) whose contents, counts and lengths are random. The contract: the server never
//! panics or hangs; every answer is well-framed; a message that names something which does
//! not exist, or cannot be decoded, gets an ErrorResponse; and after all of it a client
//! connects and queries as before. (Line protocol and remote-write bodies are fuzzed in
//! process: `engine/src/line_protocol/tests.rs`, `engine/src/prometheus/tests.rs`,
//! `server/src/http/tests.rs`.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::harness::{Server, psql};

/// A frontend message: its type byte and its body (the length is added when it is sent,
/// right unless `bad_length` says what to claim instead).
#[derive(Debug, Clone)]
struct Message {
    kind: u8,
    body: Vec<u8>,
    bad_length: Option<i32>,
}

impl Message {
    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![self.kind];
        let len = self
            .bad_length
            .unwrap_or_else(|| i32::try_from(self.body.len() + 4).unwrap_or(i32::MAX));
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

fn cstr(s: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = s.iter().copied().filter(|&b| b != 0).collect();
    v.push(0);
    v
}

fn startup() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec(); // protocol 3.0
    for s in [&b"user"[..], b"fuzz", b"database", b"forestall", b""] {
        body.extend(cstr(s));
    }
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"s1".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn sql() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"SELECT 1".to_vec()),
        Just(b"SELECT $1::bigint + $2".to_vec()),
        Just(b"SELECT * FROM nowhere WHERE x = $1".to_vec()),
        Just(b"CREATE TABLE t (x int)".to_vec()),
        proptest::string::string_regex("[ -~]{0,40}")
            .unwrap()
            .prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn i16s(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<i16>(), 0..n)
        .prop_map(|v| v.into_iter().flat_map(i16::to_be_bytes).collect())
}

/// A Bind whose counts and lengths may disagree with what follows them.
fn bind() -> impl Strategy<Value = Vec<u8>> {
    (
        name(),
        name(),
        any::<i16>(),
        i16s(3),
        proptest::collection::vec(
            (
                prop_oneof![Just(-1i32), 0i32..16, any::<i32>()],
                proptest::collection::vec(any::<u8>(), 0..16),
            ),
            0..3,
        ),
        any::<i16>(),
        i16s(3),
    )
        .prop_map(|(portal, stmt, nfmt, fmts, params, nres, res)| {
            let mut b = cstr(&portal);
            b.extend(cstr(&stmt));
            b.extend_from_slice(&nfmt.to_be_bytes());
            b.extend(fmts);
            b.extend_from_slice(&(params.len() as i16).to_be_bytes());
            for (len, bytes) in params {
                b.extend_from_slice(&len.to_be_bytes());
                b.extend(bytes);
            }
            b.extend_from_slice(&nres.to_be_bytes());
            b.extend(res);
            b
        })
}

fn message() -> impl Strategy<Value = Message> {
    let body = prop_oneof![
        (
            name(),
            sql(),
            any::<i16>(),
            proptest::collection::vec(any::<i32>(), 0..3)
        )
            .prop_map(|(n, q, count, types)| {
                let mut b = cstr(&n);
                b.extend(cstr(&q));
                b.extend_from_slice(&count.to_be_bytes());
                b.extend(types.into_iter().flat_map(i32::to_be_bytes));
                (b'P', b)
            }),
        bind().prop_map(|b| (b'B', b)),
        (prop_oneof![Just(b'S'), Just(b'P'), any::<u8>()], name()).prop_map(|(k, n)| {
            let mut b = vec![k];
            b.extend(cstr(&n));
            (b'D', b)
        }),
        (name(), any::<i32>()).prop_map(|(n, max)| {
            let mut b = cstr(&n);
            b.extend_from_slice(&max.to_be_bytes());
            (b'E', b)
        }),
        (prop_oneof![Just(b'S'), Just(b'P'), any::<u8>()], name()).prop_map(|(k, n)| {
            let mut b = vec![k];
            b.extend(cstr(&n));
            (b'C', b)
        }),
        sql().prop_map(|q| (b'Q', cstr(&q))),
        Just((b'S', Vec::new())),
        Just((b'H', Vec::new())),
        // Any type byte (Terminate, CopyData, FunctionCall, or none at all) with any body.
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..48)),
    ];
    (
        body,
        prop_oneof![
            8 => Just(None),
            1 => any::<i32>().prop_map(Some),
            1 => (0i32..8).prop_map(Some),
        ],
        // Sometimes a valid message with one byte of its body changed.
        prop_oneof![4 => Just(None), 1 => (any::<usize>(), any::<u8>()).prop_map(Some)],
    )
        .prop_map(|((kind, mut body), bad_length, flip)| {
            if let Some((at, byte)) = flip
                && !body.is_empty()
            {
                let at = at % body.len();
                body[at] = byte;
            }
            Message {
                kind,
                body,
                bad_length,
            }
        })
}

#[derive(Debug, Clone)]
enum Case {
    /// Bytes in place of the startup packet: random, or a valid one changed.
    Startup(Vec<u8>),
    /// A valid startup, then these messages.
    Session(Vec<Message>),
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        1 => prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (any::<usize>(), any::<u8>(), any::<usize>()).prop_map(|(at, byte, cut)| {
                let mut s = startup();
                let at = at % s.len();
                s[at] = byte;
                s.truncate(s.len() - cut % 4);
                s
            }),
        ]
        .prop_map(Case::Startup),
        4 => proptest::collection::vec(message(), 1..6).prop_map(Case::Session),
    ]
}

/// The backend messages in `bytes`, as (type, body); an error if they are not well framed.
fn frames(mut bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    // A refused SSL request is answered by one byte; here no startup asks for it, but a
    // random one may look like it.
    if bytes.first() == Some(&b'N') && bytes.len() == 1 {
        return Ok(vec![(b'N', Vec::new())]);
    }
    while !bytes.is_empty() {
        if bytes.len() < 5 {
            return Err(format!("a cut frame: {bytes:?}"));
        }
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let len = usize::try_from(len).map_err(|_| format!("length {len}"))?;
        if len < 4 || bytes.len() < 1 + len {
            return Err(format!("length {len} for {} bytes", bytes.len()));
        }
        out.push((bytes[0], bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    Ok(out)
}

/// Sends `payload` (after a startup, when `startup` gives one and the message type that ends
/// the server's answer to it), closes the writing half and reads everything the server says
/// until it closes.
fn exchange(pg: &str, startup: Option<(&[u8], u8)>, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(pg).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    if let Some((startup, until)) = startup {
        s.write_all(startup).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        while !frames(&got).is_ok_and(|f| f.iter().any(|(k, _)| *k == until)) {
            let n = s.read(&mut buf).map_err(|e| format!("startup: {e}"))?;
            if n == 0 {
                return Err(format!("closed during startup: {got:?}"));
            }
            got.extend_from_slice(&buf[..n]);
        }
        got.clear();
    }
    // The server may close before reading everything: a write error then is an answer.
    let _ = s.write_all(payload);
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("no end to the answer ({e}) after {got:?}")),
        }
    }
}

fn check(pg: &str, case: &Case) -> Result<(), TestCaseError> {
    match case {
        Case::Startup(bytes) => {
            let got = exchange(pg, None, bytes).map_err(TestCaseError::fail)?;
            let frames = frames(&got).map_err(TestCaseError::fail)?;
            // Garbage in place of a startup is refused; a startup that still happens to be
            // valid (a flipped byte in a parameter's value) is served.
            let served = frames.iter().any(|(k, _)| *k == b'Z');
            let refused = frames.iter().any(|(k, _)| *k == b'E') || frames.is_empty();
            prop_assert!(
                served || refused || frames == [(b'N', Vec::new())],
                "{frames:?}"
            );
        }
        Case::Session(messages) => {
            let payload: Vec<u8> = messages.iter().flat_map(Message::bytes).collect();
            let got =
                exchange(pg, Some((&startup(), b'Z')), &payload).map_err(TestCaseError::fail)?;
            let frames = frames(&got).map_err(TestCaseError::fail)?;
            // A first message that names a portal or statement nobody made, or whose
            // length is impossible, gets an error (it may be the last thing said).
            let first = &messages[0];
            let impossible = first.bad_length.is_some_and(|l| l < 4);
            let unknown = match first.kind {
                b'E' => first.body.first().is_some_and(|&b| b != 0) && first.bad_length.is_none(),
                _ => false,
            };
            if impossible || unknown {
                prop_assert!(
                    frames.iter().any(|(k, _)| *k == b'E'),
                    "no ErrorResponse for {first:?}: {frames:?}"
                );
            }
        }
    }
    Ok(())
}

/// The run passed, and the server's log has no panic in it.
fn passed_without_a_panic(
    server: &Server,
    result: Result<(), proptest::test_runner::TestError<impl std::fmt::Debug>>,
) {
    let log: Vec<String> = server.stderr.try_iter().collect();
    result.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", log.join("\n")));
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn random_postgres_messages_get_errors_and_never_break_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // PROPTEST_CASES=20000 for a longer run.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let pg = server.pg_addr.clone();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&case(), |case| {
        check(&pg, &case)?;
        // Every so often, and at the end: a real client still connects and queries.
        if n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50 == 49 {
            let (ok, out, err) = psql(&server, "SELECT 41 + 1 AS answer");
            prop_assert!(ok && out.contains("42"), "{out}{err}");
        }
        Ok(())
    });
    passed_without_a_panic(&server, result);
    let (ok, out, err) = psql(&server, "SELECT 41 + 1 AS answer");
    assert!(ok && out.contains("42"), "{out}{err}");
    server.terminate();
}

/// With auth on, random password messages (and random lengths for them) after a startup:
/// each is refused with an ErrorResponse and never authenticates, and the server keeps
/// serving.
#[test]
fn random_passwords_are_refused_and_never_break_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], &["--auth"]);
    let pg = server.pg_addr.clone();
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let password = (
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::string::string_regex("fst_[a-z0-9]{0,40}")
                .unwrap()
                .prop_map(|t| cstr(t.as_bytes())),
        ],
        prop_oneof![4 => Just(None), 1 => any::<i32>().prop_map(Some)],
    );
    let result = runner.run(&password, |(body, bad_length)| {
        let message = Message {
            kind: b'p',
            body,
            bad_length,
        };
        let got = exchange(&pg, Some((&startup(), b'R')), &message.bytes())
            .map_err(TestCaseError::fail)?;
        let frames = frames(&got).map_err(TestCaseError::fail)?;
        // (A message whose length claims more than was sent before the client hung up is
        // simply never read: there is no one left to tell.)
        if message.bad_length.is_none_or(|l| l < 4) {
            prop_assert!(
                frames.iter().any(|(k, _)| *k == b'E'),
                "no error for {message:?}: {frames:?}"
            );
        }
        prop_assert!(
            !frames.iter().any(|(k, _)| *k == b'Z'),
            "a random password was let in: {frames:?}"
        );
        Ok(())
    });
    passed_without_a_panic(&server, result);
    server.terminate();
}
