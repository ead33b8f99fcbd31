module plugbus.dev/plugbus

go 1.19
