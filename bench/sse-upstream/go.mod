module sse-upstream

go 1.19
