// spiffeapp: a SPIFFE-aware app written with go-spiffe v2, the judge of meshtls's Workload API in the e2e suite
// (e2e/test_workload_api.py builds it with `go build`). It knows nothing of meshtls: it finds the Workload API
// through SPIFFE_ENDPOINT_SOCKET, as every go-spiffe app does.
//
//	spiffeapp listen -addr 127.0.0.1:PORT -allow spiffe://td/ns/a/sa/dialer
//	    spiffetls.Listen with an X509Source, authorizing only -allow; each line read is answered "ok <line>".
//	    go-spiffe does not read the Workload API's CRLs, so the listener also follows FetchX509Bundles (the raw
//	    stub go-spiffe ships) and refuses a peer certificate on a CRL of its issuer: revocation, the SPIFFE way of
//	    carrying it, checked by the app.
//	spiffeapp dial -addr 127.0.0.1:PORT -server spiffe://td/ns/a/sa/listener [-count N] [-interval 5ms]
//	    spiffetls.Dial with an X509Source, authorizing only -server; one request per connection. Prints one JSON
//	    line per second ({"ok":..,"failed":..,"serials":..}) and one per failure; with -count, exits 0 only when
//	    all N succeeded.
package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

func say(v map[string]any) {
	v["t"] = float64(time.Now().UnixNano()) / 1e9
	line, _ := json.Marshal(v)
	fmt.Println(string(line))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "spiffeapp: "+format+"\n", args...)
	os.Exit(2)
}

// revocations: the CRLs the Workload API streams in FetchX509Bundles, by issuer.
type revocations struct {
	mu   sync.RWMutex
	crls []*x509.RevocationList
}

func (r *revocations) follow(ctx context.Context) {
	target := os.Getenv("SPIFFE_ENDPOINT_SOCKET")
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("crl stream: %v", err)
	}
	client := workload.NewSpiffeWorkloadAPIClient(conn)
	for ctx.Err() == nil {
		stream, err := client.FetchX509Bundles(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"),
			&workload.X509BundlesRequest{})
		if err == nil {
			for {
				resp, err := stream.Recv()
				if err != nil {
					break
				}
				var crls []*x509.RevocationList
				for _, der := range resp.Crl {
					if crl, err := x509.ParseRevocationList(der); err == nil {
						crls = append(crls, crl)
					}
				}
				r.mu.Lock()
				r.crls = crls
				r.mu.Unlock()
				say(map[string]any{"event": "crls", "count": len(crls)})
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// revoked: the leaf is on a CRL signed by its issuer (chain[1], as verified by go-spiffe).
func (r *revocations) revoked(chain []*x509.Certificate) bool {
	if len(chain) < 2 {
		return false
	}
	cert, issuer := chain[0], chain[1]
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, crl := range r.crls {
		if string(crl.RawIssuer) != string(cert.RawIssuer) || crl.CheckSignatureFrom(issuer) != nil {
			continue
		}
		for _, entry := range crl.RevokedCertificateEntries {
			if entry.SerialNumber.Cmp(cert.SerialNumber) == 0 {
				return true
			}
		}
	}
	return false
}

func serialOf(n *big.Int) string { return fmt.Sprintf("%x", n) }

func listen(ctx context.Context, args []string) {
	fs := flag.NewFlagSet("listen", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port")
	allow := fs.String("allow", "", "the one SPIFFE ID allowed to connect")
	_ = fs.Parse(args)
	allowed, err := spiffeid.FromString(*allow)
	if err != nil {
		fail("-allow: %v", err)
	}
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		fail("X509Source: %v", err)
	}
	defer source.Close()
	crls := &revocations{}
	go crls.follow(ctx)
	authorize := func(id spiffeid.ID, chains [][]*x509.Certificate) error {
		if id != allowed {
			say(map[string]any{"event": "refused", "peer": id.String(), "why": "not allowed"})
			return fmt.Errorf("%s is not allowed", id)
		}
		if len(chains) > 0 && crls.revoked(chains[0]) {
			say(map[string]any{"event": "refused", "peer": id.String(), "why": "revoked",
				"serial": serialOf(chains[0][0].SerialNumber)})
			return errors.New("certificate revoked")
		}
		return nil
	}
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", *addr, spiffetls.MTLSServerWithSource(authorize, source))
	if err != nil {
		fail("listen: %v", err)
	}
	go func() { <-ctx.Done(); ln.Close() }()
	svid, _ := source.GetX509SVID()
	say(map[string]any{"event": "listening", "id": svid.ID.String(), "serial": serialOf(svid.Certificates[0].SerialNumber)})
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-source.Updated():
				if svid, err := source.GetX509SVID(); err == nil {
					say(map[string]any{"event": "svid", "serial": serialOf(svid.Certificates[0].SerialNumber)})
				}
			}
		}
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("ok " + line))
		}(conn)
	}
}

func request(ctx context.Context, addr string, authorize tlsconfig.Authorizer, source *workloadapi.X509Source,
	n int) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr, spiffetls.MTLSClientWithSource(authorize, source))
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	msg := fmt.Sprintf("r%d\n", n)
	if _, err := conn.Write([]byte(msg)); err != nil {
		return err
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if reply != "ok "+msg {
		return fmt.Errorf("unexpected reply %q", strings.TrimSpace(reply))
	}
	return nil
}

func dial(ctx context.Context, args []string) {
	fs := flag.NewFlagSet("dial", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port")
	server := fs.String("server", "", "the SPIFFE ID the server must have")
	count := fs.Int("count", 0, "requests to make, then exit (0: until stopped)")
	interval := fs.Duration("interval", 5*time.Millisecond, "pause between requests")
	_ = fs.Parse(args)
	serverID, err := spiffeid.FromString(*server)
	if err != nil {
		fail("-server: %v", err)
	}
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		fail("X509Source: %v", err)
	}
	defer source.Close()
	authorize := tlsconfig.AuthorizeID(serverID)
	ok, failed := 0, 0
	serials := map[string]bool{}
	last := time.Now()
	report := func() {
		say(map[string]any{"event": "progress", "ok": ok, "failed": failed, "serials": len(serials)})
	}
	for n := 0; ctx.Err() == nil && (*count == 0 || n < *count); n++ {
		if svid, err := source.GetX509SVID(); err == nil {
			serials[serialOf(svid.Certificates[0].SerialNumber)] = true
		}
		if err := request(ctx, *addr, authorize, source, n); err != nil {
			if ctx.Err() != nil {
				break
			}
			failed++
			say(map[string]any{"event": "failure", "n": n, "error": err.Error()})
		} else {
			ok++
		}
		if time.Since(last) >= time.Second {
			report()
			last = time.Now()
		}
		time.Sleep(*interval)
	}
	report()
	if *count > 0 && failed > 0 {
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: spiffeapp listen|dial [flags]")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch os.Args[1] {
	case "listen":
		listen(ctx, os.Args[2:])
	case "dial":
		dial(ctx, os.Args[2:])
	default:
		fail("unknown command %q", os.Args[1])
	}
}
