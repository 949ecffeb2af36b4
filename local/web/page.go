package web

import (
	"bytes"
	"embed"
	"html/template"
	"io/fs"
	"net/http"
)

// The page, its script and its style are embedded: stations have no
// internet, so nothing comes from a CDN.
//
//go:embed assets
var assets embed.FS

// staticFS is what /static/ serves: the script, the style and the icon.
var staticFS = mustSub(assets, "assets/static")

var pageTmpl = template.Must(template.ParseFS(assets, "assets/page.html.tmpl"))

func mustSub(f fs.FS, dir string) fs.FS {
	sub, err := fs.Sub(f, dir)
	if err != nil {
		panic(err)
	}
	return sub
}

// pageData fills the page's frame; the script fills in the rest from the
// API and keeps it current.
type pageData struct {
	StationID, StationName, Version string
	Auth                            bool
}

func (s *Server) page(w http.ResponseWriter, r *http.Request) {
	var buf bytes.Buffer
	if err := pageTmpl.Execute(&buf, pageData{StationID: s.cfg.StationID, StationName: s.cfg.StationName,
		Version: s.cfg.Version, Auth: s.auth.Load().enabled()}); err != nil {
		s.log.Error("render status page", "err", err)
		writeError(w, http.StatusInternalServerError, "internal error")
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = buf.WriteTo(w)
}
