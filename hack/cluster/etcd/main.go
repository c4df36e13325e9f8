// Command etcd is a minimal wrapper around the upstream etcd server entry
// point, so that etcd can be built from the Go module proxy (the etcd server
// module's go.mod uses local replace directives, which blocks `go install`).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
