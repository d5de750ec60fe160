// Renders an Ollama TEMPLATE with Go's text/template, as Ollama does: the chat's
// messages as .Messages (Role, Content), the system prompt as .System and the last
// user message as .Prompt. Reads {"template": ..., "messages": [...]} on stdin.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

type Data struct {
	Messages []Message
	System   string
	Prompt   string
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	tmpl, err := template.New("t").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	d := Data{Messages: in.Messages}
	for _, m := range in.Messages {
		if m.Role == "system" {
			d.System = m.Content
		}
		if m.Role == "user" {
			d.Prompt = m.Content
		}
	}
	if err := tmpl.Execute(os.Stdout, d); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
}
