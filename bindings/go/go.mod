module example.invalid/ufa/bindings/go

go 1.21
