// A simulated game server embedding a plugbus host: it starts chat_filter and move_counter,
// ticks simulated players, publishes their moves every tick, dispatches their chat messages and
// commands, and prints what the plugins decided.
//
//	cd go && go run ./example -seconds 2
package main

import (
	"flag"
	"fmt"
	"log"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"plugbus.dev/plugbus"
)

type player struct {
	uuid    string
	name    string
	heading float64
}

var lines = []string{
	"hello everyone",
	"oh darn, I fell in lava",
	"what the heck is that",
	"anyone up for a trade?",
	"HECK yes",
	"darn creepers",
	"/filterstats",
	"gg",
}

func main() {
	log.SetFlags(0)
	chatFilter := flag.String("chat-filter", "../target/release/examples/chat_filter", "chat_filter plugin binary (relative to the working directory)")
	moveCounter := flag.String("move-counter", "../target/release/examples/move_counter", "move_counter plugin binary (relative to the working directory)")
	seconds := flag.Float64("seconds", 5, "how long to run")
	nPlayers := flag.Int("players", 100, "simulated players")
	tps := flag.Int("tps", 20, "ticks per second")
	chatEvery := flag.Int("chat-every", 3, "on average one chat line every N ticks")
	flag.Parse()

	cf, mc := absExisting(*chatFilter), absExisting(*moveCounter)
	config := fmt.Sprintf(`[host]
response_timeout_ms = 500
hello_timeout_ms = 10000

[[plugin]]
id = "chat_filter"
command = %q
args = ["--banned", "darn", "--rewrite", "heck=h*ck"]
required = true

[[plugin]]
id = "move_counter"
command = %q
required = true
`, cf, mc)

	start := time.Now()
	h, err := plugbus.Start(config)
	if err != nil {
		log.Fatalf("start: %v", err)
	}
	fmt.Printf("host started in %v\n", time.Since(start).Round(time.Millisecond))

	rng := rand.New(rand.NewSource(1))
	players := make([]player, *nPlayers)
	moves := make([]plugbus.Move, *nPlayers)
	for i := range players {
		rng.Read(moves[i].UUID[:])
		moves[i].UUID[6] = moves[i].UUID[6]&0x0f | 0x40 // version 4
		moves[i].UUID[8] = moves[i].UUID[8]&0x3f | 0x80 // RFC 4122 variant
		players[i] = player{uuid: uuidText(moves[i].UUID), name: fmt.Sprintf("player%03d", i), heading: rng.Float64() * 2 * math.Pi}
		moves[i].X, moves[i].Y, moves[i].Z = rng.Float64()*100, 64, rng.Float64()*100
	}

	period := time.Second / time.Duration(*tps)
	end := start.Add(time.Duration(*seconds * float64(time.Second)))
	next := time.Now()
	counts := map[string]int{}
	ticks := 0
	for time.Now().Before(end) {
		tk, err := h.BeginTick()
		if err != nil {
			log.Fatalf("begin tick: %v", err)
		}
		if ticks == 0 {
			for _, p := range players {
				if err := tk.PublishJoin(p.uuid, p.name); err != nil {
					log.Fatalf("join: %v", err)
				}
			}
		}
		for i := range moves {
			players[i].heading += (rng.Float64() - 0.5) * 0.3
			moves[i].X += math.Cos(players[i].heading) * 0.2
			moves[i].Z += math.Sin(players[i].heading) * 0.2
			moves[i].Yaw = float32(players[i].heading * 180 / math.Pi)
		}
		if err := tk.PublishMoves(moves); err != nil {
			log.Fatalf("publish moves: %v", err)
		}
		type sent struct {
			p       plugbus.Pending
			who     string
			message string
		}
		var dispatched []sent
		if rng.Intn(*chatEvery) == 0 {
			p := players[rng.Intn(len(players))]
			line := lines[rng.Intn(len(lines))]
			var pend plugbus.Pending
			if strings.HasPrefix(line, "/") {
				pend, err = tk.DispatchCommand(p.uuid, p.name, line)
			} else {
				pend, err = tk.DispatchChat(p.uuid, p.name, line)
			}
			if err != nil {
				log.Fatalf("dispatch: %v", err)
			}
			dispatched = append(dispatched, sent{pend, p.name, line})
		}
		if err := tk.End(); err != nil {
			log.Fatalf("end tick: %v", err)
		}
		ticks++

		for _, d := range dispatched {
			o, err := h.Wait(d.p, time.Now().Add(period))
			if err != nil {
				log.Fatalf("wait: %v", err)
			}
			var decision string
			switch {
			case o.Late > 0:
				decision = fmt.Sprintf("passed (%d plugins late)", o.Late)
			case o.Cancelled:
				decision = "cancelled"
			case o.HasChat:
				decision = fmt.Sprintf("rewritten to %q", o.Chat)
			default:
				decision = "passed"
			}
			counts[strings.SplitN(decision, " ", 2)[0]]++
			fmt.Printf("tick %4d  <%s> %-28q %s (%v)\n", tk.Number(), d.who, d.message, decision, o.Elapsed)
		}
		report(h, players)

		next = next.Add(period)
		time.Sleep(time.Until(next))
	}

	report(h, players)
	if text, err := h.Metrics(); err == nil {
		fmt.Printf("after %d ticks: move_counter was sent %s moves; chat: %v\n",
			ticks, metric(text, "move_counter", "moves_sent"), counts)
	}
	if err := h.Close("example over"); err != nil {
		log.Fatalf("close: %v", err)
	}
	fmt.Println("host closed")
}

// report prints the actions, logs and notices the plugins sent.
func report(h *plugbus.Host, players []player) {
	actions, err := h.DrainActions()
	if err != nil {
		log.Fatalf("actions: %v", err)
	}
	for _, a := range actions {
		switch {
		case a.SendChat != nil:
			fmt.Printf("           action from %s: send-chat to %s: %q\n", a.Plugin, nameOf(players, a.SendChat.Target), a.SendChat.Message)
		case a.Teleport != nil:
			fmt.Printf("           action from %s: teleport %s to %v\n", a.Plugin, nameOf(players, a.Teleport.Player), a.Teleport.Position)
		case a.Kick != nil:
			fmt.Printf("           action from %s: kick %s: %q\n", a.Plugin, nameOf(players, a.Kick.Player), a.Kick.Reason)
		default:
			fmt.Printf("           action from %s: kind %d (%d bytes)\n", a.Plugin, a.Kind, len(a.Data))
		}
	}
	logs, err := h.Logs()
	if err != nil {
		log.Fatalf("logs: %v", err)
	}
	for _, l := range logs {
		fmt.Printf("           log %s [%s] %s\n", l.Plugin, l.Level, l.Message)
	}
	notices, err := h.Notices()
	if err != nil {
		log.Fatalf("notices: %v", err)
	}
	for _, n := range notices {
		fmt.Printf("           notice %s: %s\n", n.Plugin, n.Text)
	}
}

func nameOf(players []player, uuid string) string {
	for _, p := range players {
		if p.uuid == uuid {
			return p.name
		}
	}
	return uuid
}

func metric(text, plugin, what string) string {
	re := regexp.MustCompile(`(?m)^plugbus_plugin_total\{plugin="` + regexp.QuoteMeta(plugin) + `",what="` + regexp.QuoteMeta(what) + `"\} (\d+)$`)
	if m := re.FindStringSubmatch(text); m != nil {
		return m[1]
	}
	return "?"
}

func uuidText(u [16]byte) string {
	var b strings.Builder
	for i, c := range u {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b.WriteByte('-')
		}
		if c < 16 {
			b.WriteByte('0')
		}
		b.WriteString(strconv.FormatUint(uint64(c), 16))
	}
	return b.String()
}

func absExisting(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := os.Stat(a); err != nil {
		log.Fatalf("plugin binary %s: %v (run `cargo build --release --examples` in the repository root)", a, err)
	}
	return a
}
