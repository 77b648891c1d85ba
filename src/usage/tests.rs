use super::*;

/// A chat.completion as Azure sends it, usage last.
const CHAT: &str = r#"{"choices":[{"content_filter_results":{},"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"The usage of \"usage\": {\"prompt_tokens\": 99} is fine","refusal":null,"role":"assistant"}}],"created":1733000000,"id":"chatcmpl-AZ1","model":"gpt-4o-2024-08-06","object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}],"system_fingerprint":"fp_1","usage":{"completion_tokens":17,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":5,"rejected_prediction_tokens":0},"prompt_tokens":120,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":64},"total_tokens":137}}"#;

const RESPONSE: &str = r#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"hi","annotations":[]}]}],"usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":10},"output_tokens":8,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":38},"metadata":{"usage":"not this"}}"#;

fn read_json(body: &[u8], pieces: usize) -> Option<Usage> {
    let mut reader = UsageReader::new(Shape::Json, false);
    let size = body.len().div_ceil(pieces.max(1)).max(1);
    for chunk in body.chunks(size) {
        assert_eq!(reader.feed(chunk, false), None);
    }
    reader.usage()
}

#[test]
fn usage_objects_in_both_namings() {
    let chat = Usage {
        input: 120,
        output: 17,
        cached_input: 64,
        reasoning_output: 5,
    };
    assert_eq!(read_json(CHAT.as_bytes(), 1), Some(chat));
    let responses = Usage {
        input: 30,
        output: 8,
        cached_input: 10,
        reasoning_output: 3,
    };
    assert_eq!(read_json(RESPONSE.as_bytes(), 1), Some(responses));
    let embeddings = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-2e-3]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    assert_eq!(
        read_json(embeddings, 1),
        Some(Usage {
            input: 8,
            ..Usage::default()
        })
    );
    assert_eq!(Usage::from_json(b"null"), None);
    assert_eq!(Usage::from_json(br#"{"total_tokens":5}"#), None);
    assert_eq!(read_json(br#"{"id":"x","choices":[]}"#, 1), None);
}

#[test]
fn a_json_answer_is_read_the_same_in_any_pieces() {
    let expected = read_json(CHAT.as_bytes(), 1);
    assert!(expected.is_some());
    for pieces in [2, 3, 7, 50, CHAT.len()] {
        assert_eq!(
            read_json(CHAT.as_bytes(), pieces),
            expected,
            "{pieces} pieces"
        );
    }
    // Whitespace and nesting around it do not matter.
    let pretty = "{\n  \"usage\" : {\n \"prompt_tokens\" : 1 ,\"completion_tokens\":2},\n \"x\": [[{\"usage\":{\"prompt_tokens\":9}}]]\n}";
    assert_eq!(
        read_json(pretty.as_bytes(), 5),
        Some(Usage {
            input: 1,
            output: 2,
            ..Usage::default()
        })
    );
}

#[test]
fn only_the_top_level_usage_counts() {
    // Nested `usage` keys and strings holding the word are not the usage.
    let body = br#"{"data":[{"usage":{"prompt_tokens":500}}],"meta":{"usage":{"prompt_tokens":600}},"text":"\"usage\":{\"prompt_tokens\":700}"}"#;
    assert_eq!(read_json(body, 3), None);
    // A deep document does not disturb the scan.
    let deep = format!(
        "{{\"a\":{}{},\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":1}}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    assert_eq!(read_json(deep.as_bytes(), 4).map(|u| u.input), Some(4));
}

/// A chat stream as Azure sends it; `usage` adds what include_usage does.
fn chat_stream(with_usage: bool) -> Vec<u8> {
    let null = if with_usage { r#","usage":null"# } else { "" };
    let mut out = String::new();
    out.push_str(&format!("data: {{\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{{\"prompt_index\":0,\"content_filter_results\":{{}}}}]{null}}}\n\n"));
    for (i, word) in ["Hel", "lo", " there"].iter().enumerate() {
        let role = if i == 0 { r#""role":"assistant","# } else { "" };
        out.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{{role}\"content\":\"{word}\"}},\"finish_reason\":null,\"index\":0}}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\"{null}}}\n\n"));
    }
    out.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"stop\",\"index\":0}}],\"created\":1,\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\"{null}}}\n\n"));
    if with_usage {
        out.push_str("data: {\"choices\":[],\"created\":1,\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"usage\":{\"completion_tokens\":3,\"prompt_tokens\":11,\"total_tokens\":14}}\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

/// Feeds a stream in pieces of `size`; returns what the caller got.
fn stream(reader: &mut UsageReader, bytes: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = bytes.chunks(size.max(1)).collect();
    for (i, piece) in pieces.iter().enumerate() {
        match reader.feed(piece, i + 1 == pieces.len()) {
            Some(replacement) => out.extend(replacement),
            None => out.extend_from_slice(piece),
        }
    }
    out
}

#[test]
fn a_stream_the_caller_asked_usage_of_passes_unchanged() {
    let bytes = chat_stream(true);
    for size in [1, 5, 64, 1000, bytes.len()] {
        let mut reader = UsageReader::new(Shape::ChatStream, false);
        assert_eq!(stream(&mut reader, &bytes, size), bytes, "size {size}");
        assert_eq!(
            reader.usage(),
            Some(Usage {
                input: 11,
                output: 3,
                ..Usage::default()
            })
        );
    }
}

#[test]
fn a_stream_whose_usage_the_filter_asked_for_is_what_the_caller_would_have_got() {
    let upstream = chat_stream(true);
    let expected = chat_stream(false);
    for size in [1, 2, 3, 17, 64, 333, upstream.len()] {
        let mut reader = UsageReader::new(Shape::ChatStream, true);
        let got = stream(&mut reader, &upstream, size);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "size {size}"
        );
        assert_eq!(reader.usage().map(|u| (u.input, u.output)), Some((11, 3)));
    }
}

#[test]
fn whole_events_in_a_piece_go_out_at_once_when_stripping() {
    // Azure flushes an event at a time: each piece goes out with its event.
    let upstream = chat_stream(true);
    let mut reader = UsageReader::new(Shape::ChatStream, true);
    let events: Vec<&[u8]> = upstream
        .split_inclusive(|&b| b == b'\n')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|pair| {
            let start = pair[0].as_ptr() as usize - upstream.as_ptr() as usize;
            &upstream[start..start + pair.iter().map(|l| l.len()).sum::<usize>()]
        })
        .collect();
    for event in &events[1..events.len() - 2] {
        let out = reader.feed(event, false).expect("rewritten");
        assert!(
            out.starts_with(b"data: {") && out.ends_with(b"}\n\n"),
            "{out:?}"
        );
        assert!(!out.windows(12).any(|w| w == br#""usage":null"#));
    }
    // The usage-only event goes, [DONE] stays.
    assert_eq!(
        reader.feed(events[events.len() - 2], false),
        Some(Vec::new())
    );
    assert_eq!(
        reader.feed(events[events.len() - 1], true),
        None,
        "[DONE] passes as it is"
    );
}

#[test]
fn usage_null_first_or_alone_is_cut_cleanly() {
    for (event, expected) in [
        (
            "data: {\"usage\":null,\"id\":\"a\"}\n\n",
            "data: {\"id\":\"a\"}\n\n",
        ),
        (
            "data: {\"usage\": null , \"id\":\"a\"}\n\n",
            "data: {\"id\":\"a\"}\n\n",
        ),
        (
            "data: {\"id\":\"a\", \"usage\":null}\n\n",
            "data: {\"id\":\"a\"}\n\n",
        ),
        ("data: {\"usage\":null}\r\n\r\n", "data: {}\r\n\r\n"),
        (
            "event: x\ndata:{\"a\":1,\"usage\":null}\n\n",
            "event: x\ndata:{\"a\":1}\n\n",
        ),
    ] {
        let mut reader = UsageReader::new(Shape::ChatStream, true);
        let got = reader.feed(event.as_bytes(), true).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), expected);
    }
}

fn responses_stream() -> Vec<u8> {
    let mut out = String::new();
    out.push_str("event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n");
    out.push_str("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"usage\"}\n\n");
    let big_text = "x".repeat(100_000);
    out.push_str(&format!("event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_1\",\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{big_text}\"}}]}}],\"usage\":{{\"input_tokens\":21,\"input_tokens_details\":{{\"cached_tokens\":0}},\"output_tokens\":5,\"output_tokens_details\":{{\"reasoning_tokens\":2}},\"total_tokens\":26}}}}}}\n\n"));
    out.into_bytes()
}

#[test]
fn a_responses_stream_reports_usage_in_response_completed() {
    let bytes = responses_stream();
    for size in [7, 4096, bytes.len()] {
        let mut reader = UsageReader::new(Shape::ResponsesStream, false);
        assert_eq!(stream(&mut reader, &bytes, size), bytes);
        assert_eq!(
            reader.usage(),
            Some(Usage {
                input: 21,
                output: 5,
                cached_input: 0,
                reasoning_output: 2
            })
        );
    }
}

#[test]
fn odd_streams_are_passed_and_read_as_far_as_they_go() {
    // No final blank line, CRLF line ends, comments, multi-line data.
    let bytes = b": keep-alive\r\n\r\ndata: {\"usage\":\r\ndata: {\"prompt_tokens\":2,\"completion_tokens\":1}}\r\n\r\ndata: [DONE]";
    let mut reader = UsageReader::new(Shape::ChatStream, false);
    assert_eq!(stream(&mut reader, bytes, 3), bytes.to_vec());
    assert_eq!(reader.usage().map(|u| (u.input, u.output)), Some((2, 1)));
    let mut reader = UsageReader::new(Shape::ChatStream, true);
    assert_eq!(
        stream(&mut reader, b"not sse at all", 4),
        b"not sse at all".to_vec()
    );
    assert_eq!(reader.usage(), None);
}
