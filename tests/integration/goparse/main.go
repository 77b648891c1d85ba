// goparse reads request bodies the way Go servers do, for the differential
// test: JSON with encoding/json into struct{ Model string `json:"model"` }
// (json.NewDecoder(body).Decode, as gin's ShouldBindJSON and Ollama do), and
// multipart forms with net/http's ParseMultipartForm, then
// MultipartForm.Value["model"] (what r.FormValue("model") reads first).
//
// Input on stdin: records of three frames (kind "json" or "multipart",
// content type, body), each a 4-byte big-endian length and its bytes.
// Output: one JSON line per record, {"rejected": "..."} or {"models": [...]}.
// Standard library only.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"os"
)

type reading struct {
	Rejected string   `json:"rejected,omitempty"`
	Models   []string `json:"models"`
}

func frame(r io.Reader) ([]byte, error) {
	var n uint32
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}

func readJSON(body []byte) reading {
	// A string field, as servers declare it (a null leaves it unchanged; a
	// pointer would be reset by null). The sentinel tells "no model" apart.
	const missing = "\x00missing"
	var req struct {
		Model string `json:"model"`
	}
	req.Model = missing
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&req); err != nil {
		return reading{Rejected: err.Error()}
	}
	if req.Model == missing {
		return reading{Models: []string{}}
	}
	return reading{Models: []string{req.Model}}
}

func readMultipart(contentType string, body []byte) reading {
	r, err := http.NewRequest("POST", "http://upstream/", bytes.NewReader(body))
	if err != nil {
		return reading{Rejected: err.Error()}
	}
	r.Header.Set("Content-Type", contentType)
	if err := r.ParseMultipartForm(32 << 20); err != nil {
		return reading{Rejected: err.Error()}
	}
	models := r.MultipartForm.Value["model"]
	if models == nil {
		models = []string{}
	}
	return reading{Models: models}
}

func main() {
	in := bufio.NewReader(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	encoder := json.NewEncoder(out)
	for {
		kind, err := frame(in)
		if err != nil {
			return
		}
		contentType, err1 := frame(in)
		body, err2 := frame(in)
		if err1 != nil || err2 != nil {
			os.Exit(2)
		}
		if string(kind) == "json" {
			encoder.Encode(readJSON(body))
		} else {
			encoder.Encode(readMultipart(string(contentType), body))
		}
	}
}
