//! Every parser that sees caller or upstream bytes, fed many thousands of
//! random and mutated inputs: none may panic (a panic would kill the
//! worker's VM), and each must answer Ok or a clean error.

use crate::body::{boundary, find_field, find_model, BodySource};
use crate::config::Config;
use crate::headers;
use crate::routes::classify;
use crate::token::{parse_token_response, TokenState};
use crate::upstream_errors::{translate, Encoding};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `seed` with a few random byte flips, insertions, deletions and cuts.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        const INTERESTING: &[u8] = b"\"{}[]:,\\\r\n-=;\x00\xff0";
        let mut out = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(5) {
                0 if at < out.len() => out[at] = self.next() as u8,
                1 => {
                    let byte = INTERESTING[self.below(INTERESTING.len())];
                    out.insert(at, byte);
                }
                2 if at < out.len() => {
                    out.remove(at);
                }
                3 => out.truncate(at),
                _ => {
                    let from = self.below(out.len() + 1);
                    let take = self.below(16);
                    let piece: Vec<u8> = out[from..].iter().take(take).copied().collect();
                    out.splice(at..at, piece);
                }
            }
        }
        out
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const ROUNDS: usize = 20_000;

#[test]
fn json_model_finder_never_panics() {
    let seeds: [&[u8]; 4] = [
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        br#"{"mod\u0065l":"a\"b","x":[1,2,{"y":null}],"z":-1.5e3}"#,
        br#"  {"input":"x", "model" : "m" }  "#,
        b"[]",
    ];
    let mut rng = Rng(1);
    for i in 0..ROUNDS {
        let input = rng.mutate(seeds[i % seeds.len()]);
        if let Ok(field) = find_model(&input) {
            assert_eq!(
                input.get(field.span.clone()).map(|s| s.first()),
                Some(Some(&b'"'))
            );
            assert!(field.value.is_some());
        }
    }
}

#[test]
fn multipart_finder_never_panics_and_reads_in_bounds() {
    let seed = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--b\r\n\
                 Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n\x00\xff--b\r\n\r\n--b--\r\n";
    let mut rng = Rng(2);
    for _ in 0..ROUNDS {
        let input = rng.mutate(seed);
        let mut source: &[u8] = &input;
        if let Ok(Some(field)) = find_field(&mut source, b"b") {
            assert_eq!(
                input.get(field.span).map(<[u8]>::to_vec),
                Some(field.value.into_bytes())
            );
        }
    }
    for content_type in [
        &b"multipart/form-data; boundary=\"x;y\""[..],
        b"multipart/form-data; boundary",
    ] {
        for _ in 0..2_000 {
            let _ = boundary(Some(&rng.mutate(content_type)));
        }
    }
}

#[test]
fn header_map_decoder_never_panics() {
    let seed = headers::encode(&[
        (b":path", b"/v1/chat/completions"),
        (b"authorization", b"Bearer k"),
    ]);
    let mut rng = Rng(3);
    for i in 0..ROUNDS {
        let input = if i % 4 == 0 {
            let len = rng.below(64);
            rng.bytes(len)
        } else {
            rng.mutate(&seed)
        };
        if let Some(decoded) = headers::decode(&input) {
            assert_eq!(headers::decode(&headers::encode(&decoded)), Some(decoded));
        }
    }
}

#[test]
fn request_classifier_never_panics() {
    let seeds: [&[u8]; 4] = [
        b"/v1/chat/completions?api-version=1",
        b"/openai/deployments/gpt-4o/audio/transcriptions",
        b"/v1/responses/resp_1/input_items?limit=2&api-version=x",
        b"/v1/models/meta%2Fllama",
    ];
    let mut rng = Rng(4);
    for i in 0..ROUNDS {
        let path = rng.mutate(seeds[i % seeds.len()]);
        let method: &[u8] = [&b"GET"[..], b"POST", b"DELETE", b"\xff"][i % 4];
        let _ = classify(method, &path);
    }
}

#[test]
fn identity_endpoint_and_azure_error_readers_never_panic() {
    let seeds: [&[u8]; 3] = [
        br#"{"token_type":"Bearer","expires_in":"3599","access_token":"eyJ0.a.b"}"#,
        br#"{"error":"invalid_client","error_description":"AADSTS7000215: x","error_codes":[7000215]}"#,
        br#"{"statusCode":401,"message":"Unauthorized"}"#,
    ];
    let mut rng = Rng(5);
    for i in 0..ROUNDS {
        let body = rng.mutate(seeds[i % seeds.len()]);
        let _ = parse_token_response(Some([200, 400, 401, 503][i % 4]), &body);
        let _ = translate(
            [401, 404][i % 2],
            &body,
            &Encoding::Identity,
            "alias",
            "upstream",
        );
        // Mutated compressed answers go through the decoders too.
        let mut gzipped = vec![0x1f, 0x8b, 8, rng.below(32) as u8, 0, 0, 0, 0, 0, 3];
        gzipped.extend(miniz_oxide::deflate::compress_to_vec(&body, 1));
        let _ = translate(
            404,
            &rng.mutate(&gzipped),
            &Encoding::Gzip,
            "alias",
            "upstream",
        );
        let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&body, 1);
        let _ = translate(
            404,
            &rng.mutate(&zlib),
            &Encoding::Deflate,
            "alias",
            "upstream",
        );
        let _ = TokenState::decode(&body);
    }
}

#[test]
fn configuration_reader_never_panics() {
    let seed = br#"{"upstreams":{"w":{"endpoint":"https://a.openai.azure.com","cluster":"c",
        "api_versions":{"responses":"2025-04-01-preview"},"auth":{"entra":{"tenant_id":"t",
        "client_id":"11111111-2222-3333-4444-555555555555","client_secret":{"value":"s"},
        "token_cluster":"e"}}}},"models":{"m":{"upstream":"w","deployment":"d"}},
        "callers":[{"name":"n","key_sha256":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","models":["*"]}]}"#;
    assert!(Config::from_json(seed, &|_| None).is_ok());
    let mut rng = Rng(6);
    for _ in 0..5_000 {
        let _ = Config::from_json(&rng.mutate(seed), &|_| None);
    }
}

#[test]
fn slice_body_source_clamps_reads() {
    let mut source: &[u8] = b"abc";
    assert_eq!(source.read(1, 10).unwrap(), b"bc");
    assert_eq!(source.read(5, 10).unwrap(), b"");
    assert_eq!(source.read(usize::MAX, usize::MAX).unwrap(), b"");
}
