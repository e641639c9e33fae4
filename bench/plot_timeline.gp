# Plots reserved bytes of every policy and the trace's allocated bytes over the replay of one
# trace. Called by scripts/main.sh:
#   gnuplot -e "dir='DIR'; trace='NAME'; out='FILE.png'" bench/plot_timeline.gp
# DIR holds one file per policy, <policy>.dat: "event allocated_bytes reserved_bytes".
set terminal pngcairo size 1200,700 enhanced font "DejaVu Sans,11"
set output out
set title sprintf("Reserved vs allocated memory over the replay of trace \"%s\"", trace)
set xlabel "allocator event (alloc or free) in the trace"
set ylabel "GiB"
set key top left box opaque
set grid ytics lc rgb "#dddddd"
set yrange [0:*]
GiB = 1024.0 ** 3
plot dir."/stitchalloc.dat" using 1:($2/GiB) with lines lw 1 lc rgb "#000000" title "allocated (live tensors)", \
     dir."/native.dat" using 1:($3/GiB) with lines lw 5 lc rgb "#d62728" title "reserved: PyTorch native (model)", \
     dir."/expandable.dat" using 1:($3/GiB) with lines lw 2 lc rgb "#ff7f0e" title "reserved: PyTorch expandable\\_segments (model)", \
     dir."/stitchalloc-nostitch.dat" using 1:($3/GiB) with lines lw 2 dt 2 lc rgb "#1f3fbf" title "reserved: stitchalloc, stitching off", \
     dir."/stitchalloc.dat" using 1:($3/GiB) with lines lw 3 lc rgb "#2ca02c" title "reserved: stitchalloc"
