"""Figures as data, saved three ways: ``.png`` (matplotlib), ``.html`` (interactive) and ``.json`` (the numbers).

Why our own HTML renderer: the machines are offline (no CDN) and plotly is not installed, yet users want to hover
over a heatmap cell and read the layer, the step and the value. A figure is a small dataclass; ``save`` writes the
PNG with matplotlib (Agg) and an HTML page that carries the same numbers as JSON plus ~200 lines of inline
JavaScript drawing a canvas heatmap or SVG charts with tooltips. ``fragment`` gives the same chart as an embeddable
``<div>`` for the comparison report, which includes ``SCRIPT`` once.

JSON cannot hold NaN or infinity: both are written as ``null`` (an exact quantization has SNR +inf and shows as a
missing value, with the reason in the figure's note).
"""
from __future__ import annotations

import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter

COLORMAPS = ("viridis", "diverging")
MAX_ANNOTATED_CELLS = 120  # PNG heatmaps print each value only when small; text layout dominates render time
_MPL_CMAP = {"viridis": "viridis", "diverging": "RdBu_r"}


@dataclass
class Heatmap:
    """``values`` [rows, cols]; ``normalize="column"`` colours each column by its own min..max (tooltips stay raw)."""

    title: str
    values: list[list[float]]
    row_labels: list[str]
    col_labels: list[str]
    value_label: str = "value"
    colormap: str = "viridis"  # one of COLORMAPS; "diverging" is centred on 0
    normalize: str = "none"  # "none" or "column"
    note: str = ""
    kind: str = "heatmap"


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None  # band (e.g. min over seeds)
    hi: list[float] | None = None


@dataclass
class LineChart:
    title: str
    series: list[Series]
    x_label: str = "step"
    y_label: str = ""
    log_y: bool = False
    note: str = ""
    kind: str = "lines"


@dataclass
class BarChart:
    """Grouped bars: ``values[series][i]`` is the bar of ``labels[i]``."""

    title: str
    labels: list[str]
    values: dict[str, list[float]]
    x_label: str = ""
    y_label: str = ""
    log_y: bool = False
    note: str = ""
    kind: str = "bars"


@dataclass
class Scatter:
    """Points grouped by ``groups[i]`` (one colour per group); ``labels[i]`` is shown on hover."""

    title: str
    x: list[float]
    y: list[float]
    labels: list[str]
    groups: list[str]
    x_label: str = ""
    y_label: str = ""
    note: str = ""
    kind: str = "scatter"


@dataclass
class Grid:
    """Several panels side by side under one title (e.g. dequantized weight and its error)."""

    title: str
    panels: list[Union[Heatmap, LineChart, BarChart, Scatter]] = field(default_factory=list)
    note: str = ""
    kind: str = "grid"


Figure = Union[Heatmap, LineChart, BarChart, Scatter, Grid]


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN/inf); numpy and torch scalars become Python floats."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def to_json(figure: Figure) -> dict[str, Any]:
    return json_safe(asdict(figure))


def _array(values: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)


def _tick_positions(n: int, max_ticks: int = 40) -> list[int]:
    step = max(1, math.ceil(n / max_ticks))
    return list(range(0, n, step))


def _is_index(labels: Sequence[str]) -> bool:
    """Labels "0", "1", ... (matrix indices): matplotlib's numeric ticks are better than one label per cell."""
    return all(label == str(i) for i, label in enumerate(labels))


def _draw_heatmap(ax: Axes, fig: MplFigure, hm: Heatmap) -> None:
    data = _array(hm.values) if hm.values else np.zeros((0, 0))
    shown = data
    if hm.normalize == "column" and data.size:
        with np.errstate(invalid="ignore", divide="ignore"):
            finite = np.where(np.isfinite(data), data, np.nan)
            lo, hi = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
            span = np.where(hi > lo, hi - lo, 1.0)
            shown = (finite - lo) / span
    finite_vals = shown[np.isfinite(shown)] if shown.size else np.array([])
    kwargs: dict[str, Any] = {}
    if hm.colormap == "diverging" and finite_vals.size:
        bound = float(np.abs(finite_vals).max()) or 1.0
        kwargs = {"vmin": -bound, "vmax": bound}
    cmap = matplotlib.colormaps[_MPL_CMAP[hm.colormap]].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=cmap, **kwargs)
    label = f"{hm.value_label} (per-column min..max)" if hm.normalize == "column" else hm.value_label
    fig.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.02)
    rows, cols = data.shape if data.ndim == 2 else (0, 0)
    if hm.row_labels and not _is_index(hm.row_labels):
        ticks = _tick_positions(rows)
        ax.set_yticks(ticks, [hm.row_labels[i] for i in ticks], fontsize=7)
    if hm.col_labels and not _is_index(hm.col_labels):
        ticks = _tick_positions(cols, 30)
        ax.set_xticks(ticks, [hm.col_labels[i] for i in ticks], fontsize=7, rotation=60, ha="right")
    if hm.normalize == "column" and rows * cols <= MAX_ANNOTATED_CELLS:
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(data[r, c]):
                    dark = not np.isfinite(shown[r, c]) or shown[r, c] < 0.6  # viridis is dark below ~0.6
                    ax.text(c, r, f"{data[r, c]:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    ax.set_title(hm.title, fontsize=9)


def _draw_lines(ax: Axes, chart: LineChart) -> None:
    for series in chart.series:
        x = np.asarray(series.x, dtype=np.float64)
        y = np.array([np.nan if v is None else v for v in series.y], dtype=np.float64)
        marker = "o" if len(x) <= 30 else None  # a curve of one or a few points is otherwise invisible
        (line,) = ax.plot(x, y, label=series.name, linewidth=1.2, marker=marker, markersize=3)
        if series.lo is not None and series.hi is not None:
            lo = np.array([np.nan if v is None else v for v in series.lo], dtype=np.float64)
            hi = np.array([np.nan if v is None else v for v in series.hi], dtype=np.float64)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if chart.log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # not 10^x notation: loss ranges span under a decade
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.set_title(chart.title, fontsize=9)
    ax.grid(alpha=0.3)
    if chart.series:
        ax.legend(fontsize=7)


def _draw_bars(ax: Axes, chart: BarChart) -> None:
    n_series = max(len(chart.values), 1)
    width = 0.8 / n_series
    positions = np.arange(len(chart.labels))
    for i, (name, values) in enumerate(chart.values.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(positions + (i - (n_series - 1) / 2) * width, heights, width=width, label=name)
    ticks = _tick_positions(len(chart.labels), 40)
    ax.set_xticks(positions[ticks], [chart.labels[i] for i in ticks], fontsize=7, rotation=60, ha="right")
    if chart.log_y:
        ax.set_yscale("log")
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.set_title(chart.title, fontsize=9)
    if len(chart.values) > 1:
        ax.legend(fontsize=7)


def _draw_scatter(ax: Axes, chart: Scatter) -> None:
    for group in dict.fromkeys(chart.groups):
        idx = [i for i, g in enumerate(chart.groups) if g == group]
        x = [np.nan if chart.x[i] is None else chart.x[i] for i in idx]
        y = [np.nan if chart.y[i] is None else chart.y[i] for i in idx]
        ax.scatter(x, y, s=14, label=group)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.set_title(chart.title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(set(chart.groups)) > 1:
        ax.legend(fontsize=7)


def _draw(ax: Axes, fig: MplFigure, panel: Figure) -> None:
    if isinstance(panel, Heatmap):
        _draw_heatmap(ax, fig, panel)
    elif isinstance(panel, LineChart):
        _draw_lines(ax, panel)
    elif isinstance(panel, BarChart):
        _draw_bars(ax, panel)
    elif isinstance(panel, Scatter):
        _draw_scatter(ax, panel)
    else:
        raise TypeError(f"cannot draw a {type(panel).__name__} inside a panel")


def _margins(panels: Sequence[Figure]) -> tuple[float, float]:
    """(left, bottom) margins in inches that fit the longest tick labels (fixed layout: tight_layout costs a
    second full draw, which doubled render time)."""
    left, bottom = 0.7, 0.6
    for panel in panels:
        if isinstance(panel, Heatmap):
            if panel.row_labels and not _is_index(panel.row_labels):
                left = max(left, 0.3 + 0.06 * max(map(len, panel.row_labels)))
            if panel.col_labels and not _is_index(panel.col_labels):
                bottom = max(bottom, 0.45 + 0.05 * max(map(len, panel.col_labels)))
        elif isinstance(panel, BarChart) and panel.labels:
            bottom = max(bottom, 0.55 + 0.05 * max(map(len, panel.labels)))
    return min(left, 3.0), min(bottom, 2.5)


def png_bytes(figure: Figure) -> bytes:
    """Render with matplotlib; the height grows with the number of heatmap rows so labels stay readable."""
    panels = figure.panels if isinstance(figure, Grid) else [figure]
    left, bottom = _margins(panels)
    top = 0.4 + (0.3 if isinstance(figure, Grid) else 0.0)
    bottom += 0.35 if figure.note else 0.0
    plot_height = 3.2
    for panel in panels:
        if isinstance(panel, Heatmap) and panel.row_labels and not _is_index(panel.row_labels):
            plot_height = max(plot_height, min(0.16 * len(panel.values), 22.0))
    right = 1.1  # colour bar and its label
    width = left + len(panels) * 5.0 + (len(panels) - 1) * (left + right) + right
    height = top + plot_height + bottom
    # The object API (no pyplot): no global figure registry, so rendering is safe off the main thread.
    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=(left + right) / 5.0)
    for ax, panel in zip(axes[0], panels, strict=True):
        _draw(ax, fig, panel)
    if isinstance(figure, Grid):
        fig.suptitle(figure.title, fontsize=10)
    if figure.note:
        fig.text(0.01, 0.1 / height, figure.note, fontsize=6, color="#555555", wrap=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


SCRIPT = r"""
(function(){
const VIRIDIS=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
const DIVERGING=[[33,102,172],[103,169,207],[247,247,247],[239,138,98],[178,24,43]];
const PALETTE=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
function ramp(stops,t){if(t===null||isNaN(t))return 'rgb(187,187,187)';t=Math.min(1,Math.max(0,t));
 const p=t*(stops.length-1),i=Math.min(Math.floor(p),stops.length-2),f=p-i,a=stops[i],b=stops[i+1];
 return 'rgb('+a.map((v,k)=>Math.round(v+(b[k]-v)*f)).join(',')+')';}
function fmt(v){if(v===null||v===undefined)return 'n/a';if(typeof v!=='number')return String(v);
 const a=Math.abs(v);return (a!==0&&(a<1e-3||a>=1e5))?v.toExponential(3):(+v.toPrecision(4)).toString();}
function el(tag,attrs,parent){const ns=['svg','path','rect','circle','line','text','polygon','g','title'];
 const e=ns.includes(tag)?document.createElementNS('http://www.w3.org/2000/svg',tag):document.createElement(tag);
 for(const k in attrs||{})e.setAttribute(k,attrs[k]);if(parent)parent.appendChild(e);return e;}
function tip(){let t=document.getElementById('fp4tip');if(!t){t=el('div',{id:'fp4tip'},document.body);
 t.style.cssText='position:fixed;pointer-events:none;background:#222;color:#fff;font:12px sans-serif;'+
 'padding:4px 6px;border-radius:3px;display:none;z-index:10;white-space:pre';}return t;}
function show(ev,text){const t=tip();t.textContent=text;t.style.display='block';
 t.style.left=(ev.clientX+12)+'px';t.style.top=(ev.clientY+12)+'px';}
function hide(){tip().style.display='none';}
function heatmap(box,f){
 const R=f.values.length,C=R?f.values[0].length:0,cell=Math.max(2,Math.min(56,Math.floor(900/Math.max(C,1))));
 const ch=Math.max(2,Math.min(18,Math.floor(700/Math.max(R,1))));
 const isIndex=ls=>ls.every((l,i)=>l===String(i));
 const wrap=el('div',{style:'display:flex;align-items:flex-start;gap:6px'},box);
 const labels=el('div',{style:'font:10px sans-serif;text-align:right;line-height:'+ch+'px'},wrap);
 if(ch>=9&&!isIndex(f.row_labels))f.row_labels.forEach(l=>{const d=el('div',{},labels);d.textContent=l;
  d.style.height=ch+'px';});
 const col=el('div',{},wrap);const cv=el('canvas',{width:C*cell,height:R*ch,style:'display:block'},col);
 const g=cv.getContext('2d');
 if(cell>=9&&f.col_labels.length&&!isIndex(f.col_labels)){const n=Math.max(...f.col_labels.map(l=>l.length));
  const sv=el('svg',{width:C*cell,height:6*n+6,style:'display:block;font:10px sans-serif'},col);
  f.col_labels.forEach((l,c)=>{const x=c*cell+cell/2+3;el('text',{x:x,y:2,transform:'rotate(90 '+x+' 2)'},sv)
   .textContent=l;});}
 const lo=[],hi=[];for(let c=0;c<C;c++){lo.push(Infinity);hi.push(-Infinity);}
 let glo=Infinity,ghi=-Infinity;
 f.values.forEach(r=>r.forEach((v,c)=>{if(v===null)return;lo[c]=Math.min(lo[c],v);hi[c]=Math.max(hi[c],v);
  glo=Math.min(glo,v);ghi=Math.max(ghi,v);}));
 const bound=Math.max(Math.abs(glo),Math.abs(ghi))||1;
 function t(v,c){if(v===null)return null;if(f.normalize==='column')return hi[c]>lo[c]?(v-lo[c])/(hi[c]-lo[c]):0.5;
  if(f.colormap==='diverging')return (v/bound+1)/2;return ghi>glo?(v-glo)/(ghi-glo):0.5;}
 const stops=f.colormap==='diverging'?DIVERGING:VIRIDIS;
 f.values.forEach((r,i)=>r.forEach((v,c)=>{g.fillStyle=ramp(stops,t(v,c));g.fillRect(c*cell,i*ch,cell,ch);}));
 cv.addEventListener('mousemove',ev=>{const b=cv.getBoundingClientRect();
  const c=Math.floor((ev.clientX-b.left)/cell),i=Math.floor((ev.clientY-b.top)/ch);
  if(i<0||i>=R||c<0||c>=C)return hide();
  show(ev,(f.row_labels[i]??i)+'\n'+(f.col_labels[c]??c)+'\n'+f.value_label+' = '+fmt(f.values[i][c]));});
 cv.addEventListener('mouseleave',hide);
 const legend=el('div',{style:'font:11px sans-serif;margin-top:4px'},box);
 legend.textContent=f.normalize==='column'?'colour: each column scaled to its own min..max; hover for values':
  (f.value_label+': '+fmt(f.colormap==='diverging'?-bound:glo)+' .. '+fmt(f.colormap==='diverging'?bound:ghi));}
function axes(box,f,xs,ys,logy){
 const W=640,H=340,L=64,B=46,T=10,Rm=10,svg=el('svg',{width:W,height:H,style:'font:11px sans-serif'},box);
 const fy=v=>logy?Math.log10(v):v;let x0=Math.min(...xs),x1=Math.max(...xs),y0=Math.min(...ys.map(fy)),
 y1=Math.max(...ys.map(fy));if(!(x1>x0)){x0-=1;x1+=1;}if(!(y1>y0)){y0-=1;y1+=1;}
 const pad=(y1-y0)*0.05;y0-=pad;y1+=pad;
 const sx=v=>L+(v-x0)/(x1-x0)*(W-L-Rm),sy=v=>T+(1-(fy(v)-y0)/(y1-y0))*(H-T-B);
 el('line',{x1:L,y1:H-B,x2:W-Rm,y2:H-B,stroke:'#333'},svg);el('line',{x1:L,y1:T,x2:L,y2:H-B,stroke:'#333'},svg);
 for(let k=0;k<=4;k++){const yv=y0+(y1-y0)*k/4,py=T+(1-k/4)*(H-T-B);
  el('line',{x1:L,y1:py,x2:W-Rm,y2:py,stroke:'#eee'},svg);
  el('text',{x:L-4,y:py+4,'text-anchor':'end'},svg).textContent=fmt(logy?Math.pow(10,yv):yv);
  const xv=x0+(x1-x0)*k/4;el('text',{x:L+(W-L-Rm)*k/4,y:H-B+14,'text-anchor':'middle'},svg).textContent=fmt(xv);}
 el('text',{x:(L+W)/2,y:H-8,'text-anchor':'middle'},svg).textContent=f.x_label||'';
 el('text',{x:12,y:(T+H-B)/2,transform:'rotate(-90 12 '+(T+H-B)/2+')','text-anchor':'middle'},svg).textContent=
  f.y_label||'';return {svg,sx,sy};}
function lines(box,f){
 const xs=[],ys=[];f.series.forEach(s=>{s.x.forEach((x,i)=>{if(s.y[i]!==null&&(!f.log_y||s.y[i]>0)){xs.push(x);
  ys.push(s.y[i]);}});(s.lo||[]).concat(s.hi||[]).forEach(v=>{if(v!==null&&(!f.log_y||v>0))ys.push(v);});});
 if(!xs.length){box.appendChild(document.createTextNode('no data'));return;}
 const {svg,sx,sy}=axes(box,f,xs,ys,f.log_y);
 f.series.forEach((s,k)=>{const col=PALETTE[k%PALETTE.length];
  if(s.lo&&s.hi){const up=[],dn=[];s.x.forEach((x,i)=>{if(s.lo[i]!==null&&s.hi[i]!==null){
   up.push(sx(x)+','+sy(s.hi[i]));
   dn.unshift(sx(x)+','+sy(s.lo[i]));}});if(up.length)el('polygon',{points:up.concat(dn).join(' '),fill:col,
   'fill-opacity':0.18,stroke:'none'},svg);}
  let d='';s.x.forEach((x,i)=>{const y=s.y[i];if(y===null||(f.log_y&&y<=0)){return;}d+=(d?'L':'M')+sx(x)+' '+sy(y);});
  el('path',{d:d,fill:'none',stroke:col,'stroke-width':1.6},svg);
  const few=s.x.length<=30;s.x.forEach((x,i)=>{if(s.y[i]===null)return;const c=el('circle',{cx:sx(x),
   cy:sy(s.y[i]),r:3,fill:col,'fill-opacity':few?0.9:0.01},svg);
   c.addEventListener('mousemove',ev=>show(ev,s.name+'\n'+(f.x_label||'x')+' = '+fmt(x)+'\n'+
    (f.y_label||'y')+' = '+fmt(s.y[i])+(s.lo?'\nrange '+fmt(s.lo[i])+' .. '+fmt(s.hi[i]):'')));
   c.addEventListener('mouseleave',hide);});});
 legend(box,f.series.map(s=>s.name));}
function legend(box,names){const d=el('div',{style:'font:11px sans-serif'},box);names.forEach((n,k)=>{
 const s=el('span',{style:'margin-right:12px'},d);s.innerHTML='<b style="color:'+PALETTE[k%PALETTE.length]+
 '">&#9632;</b> ';s.appendChild(document.createTextNode(n));});}
function bars(box,f){const names=Object.keys(f.values),ys=[0];names.forEach(n=>f.values[n].forEach(v=>{
 if(v!==null&&(!f.log_y||v>0))ys.push(v);}));if(f.log_y)ys.shift();
 const n=f.labels.length,{svg,sx,sy}=axes(box,f,[-0.5,n-0.5],ys.length?ys:[1],f.log_y),w=(sx(1)-sx(0))*0.8/names.length;
 names.forEach((name,k)=>f.values[name].forEach((v,i)=>{if(v===null||(f.log_y&&v<=0))return;
  const base=f.log_y?sy(Math.min(...ys)):sy(0),top=sy(v),x=sx(i)-0.4*(sx(1)-sx(0))+k*w;
  const r=el('rect',{x:x,y:Math.min(base,top),width:Math.max(w-1,1),height:Math.abs(base-top),
   fill:PALETTE[k%PALETTE.length]},svg);r.addEventListener('mousemove',ev=>show(ev,f.labels[i]+
   (names.length>1?' / '+name:'')+'\n'+(f.y_label||'value')+' = '+fmt(v)));r.addEventListener('mouseleave',hide);}));
 if(names.length>1)legend(box,names);}
function scatter(box,f){const xs=[],ys=[];
 f.x.forEach((x,i)=>{if(x!==null&&f.y[i]!==null){xs.push(x);ys.push(f.y[i]);}});
 if(!xs.length){box.appendChild(document.createTextNode('no data'));return;}
 const {svg,sx,sy}=axes(box,f,xs,ys,false),groups=[...new Set(f.groups)];
 f.x.forEach((x,i)=>{if(x===null||f.y[i]===null)return;const c=el('circle',{cx:sx(x),cy:sy(f.y[i]),r:4,
  fill:PALETTE[groups.indexOf(f.groups[i])%PALETTE.length],'fill-opacity':0.8},svg);
  c.addEventListener('mousemove',ev=>show(ev,f.labels[i]+'\n'+f.x_label+' = '+fmt(x)+'\n'+f.y_label+' = '+
  fmt(f.y[i])));c.addEventListener('mouseleave',hide);});if(groups.length>1)legend(box,groups);}
function render(id,f){const box=document.getElementById(id);const h=el('div',{style:
 'font:bold 13px sans-serif;margin:4px 0'},box);h.textContent=f.title;
 if(f.kind==='grid'){const row=el('div',{style:'display:flex;flex-wrap:wrap;gap:16px'},box);
  f.panels.forEach((p,k)=>{const sub=el('div',{id:id+'_'+k},row);render(id+'_'+k,p);});}
 else ({heatmap,lines,bars,scatter})[f.kind](box,f);
 if(f.note){const n=el('div',{style:'font:11px sans-serif;color:#555;max-width:900px;margin-top:4px'},box);
  n.textContent=f.note;}}
window.fp4render=render;})();
"""


def fragment(figure: Figure, element_id: str) -> str:
    """An embeddable ``<div>`` plus the call that draws ``figure`` into it (the page must include ``SCRIPT``)."""
    payload = json.dumps(to_json(figure)).replace("</", "<\\/")
    return (f'<div class="fp4fig" id="{html.escape(element_id)}"></div>\n'
            f"<script>fp4render({json.dumps(element_id)}, {payload});</script>")


def standalone_html(figure: Figure) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(figure.title)}</title></head>\n<body style='margin:12px'>\n"
            f"<script>{SCRIPT}</script>\n{fragment(figure, 'figure')}\n</body></html>\n")


def save(figure: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png``, ``stem.html`` and ``stem.json``; return the three paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: layer names contain dots ("encoder.0.conv").
    png, page, data = (stem.parent / f"{stem.name}{ext}" for ext in (".png", ".html", ".json"))
    png.write_bytes(png_bytes(figure))
    page.write_text(standalone_html(figure))
    data.write_text(json.dumps(to_json(figure)) + "\n")
    return [png, page, data]
