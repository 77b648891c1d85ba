// A stand-in upstream for the benchmark's streaming case: it answers every
// POST with a chat completion stream the way Azure sends one (an event per
// token, each flushed), ending with a usage event when the request asked
// for it (stream_options.include_usage). It prints the port it listens on.
package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
)

func main() {
	events := 20
	if len(os.Args) > 1 {
		if n, err := strconv.Atoi(os.Args[1]); err == nil {
			events = n
		}
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	http.Serve(listener, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		usage := bytes.Contains(body, []byte(`"include_usage":true`))
		null := ""
		if usage {
			null = `,"usage":null`
		}
		w.Header().Set("content-type", "text/event-stream")
		flusher, _ := w.(http.Flusher)
		for i := 0; i < events; i++ {
			fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"w%d \"},\"finish_reason\":null}]%s}\n\n", i, null)
			if flusher != nil {
				flusher.Flush()
			}
		}
		if usage {
			fmt.Fprint(w, "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":20,\"total_tokens\":34}}\n\n")
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	}))
}
